//! TLS: both listeners serve TLS only with `[server.tls]`, require client
//! certificates with `client_ca`, hand the client's common name to the
//! request path, reload their certificates without a restart; backends
//! reach PostgreSQL and Redis over TLS; passwords come from files.
//!
//! Certificates are made here, per test, by [`Pki`].

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::binary::{Prism, STARTUP};
use common::requests::{get, put};
use prism::proto::key_value_client::KeyValueClient;
use prism::proto::key_value_server::{KeyValue, KeyValueServer};
use prism::proto::{
    DeleteRequest, DeleteResponse, ExistsRequest, ExistsResponse, GetRequest, GetResponse,
    PutRequest, PutResponse, ScanRequest, ScanResponse,
};
use prism::tls::{CertFiles, PeerCommonName, ServerCerts};
use prism::Settings;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

// ---------------------------------------------------------------------------
// Certificates

/// A throwaway CA and the files of the certificates it signs, in a
/// temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM, and where they were written.
struct Issued {
    cert_pem: String,
    key_pem: String,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
        };
        pki.write("ca.pem", &pki.ca_pem());
        pki
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// A certificate for `localhost` and 127.0.0.1 with subject CN `cn`,
    /// written as `<file>.pem` and `<file>.key`.
    fn server(&self, file: &str, cn: &str) -> Issued {
        self.issue(
            file,
            cn,
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate with subject CN `cn`.
    fn client(&self, file: &str, cn: &str) -> Issued {
        self.issue(file, cn, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        file: &str,
        cn: &str,
        names: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Issued {
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        Issued {
            cert: self.write(&format!("{file}.pem"), &cert_pem),
            key: self.write(&format!("{file}.key"), &key_pem),
            cert_pem,
            key_pem,
        }
    }

    /// A `[server.tls]` section serving `server`, requiring client
    /// certificates of this CA when `mtls`.
    fn section(&self, server: &Issued, mtls: bool) -> String {
        let mut s = format!(
            "[server.tls]\ncert = {:?}\nkey = {:?}\n",
            server.cert.display().to_string(),
            server.key.display().to_string()
        );
        if mtls {
            s += &format!("client_ca = {:?}\n", self.ca_path().display().to_string());
        }
        s
    }
}

/// Settings with a memory namespace `cache` and `extra`.
fn settings(extra: &str) -> Settings {
    common::settings(&format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
shutdown_grace = "10s"
drain_delay = "0s"

[backends.memory]
kind = "memory"

[namespaces.cache]
backend = "memory"

{extra}
"#
    ))
}

// ---------------------------------------------------------------------------
// Clients

/// A gRPC client of `addr` over TLS trusting `pki`'s CA, presenting
/// `identity` when given.
async fn grpc_client(
    addr: SocketAddr,
    pki: &Pki,
    identity: Option<&Issued>,
) -> Result<KeyValueClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca_pem()))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(KeyValueClient::new(channel))
}

/// An HTTPS client trusting `pki`'s CA, presenting `identity` when given.
fn https_client(pki: &Pki, identity: Option<&Issued>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(10))
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem().as_bytes()).unwrap());
    if let Some(id) = identity {
        let pem = format!("{}{}", id.cert_pem, id.key_pem);
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// A Put then a Get of `key` over gRPC; the value read back.
async fn grpc_round_trip(
    client: &mut KeyValueClient<Channel>,
    key: &str,
) -> Result<Vec<u8>, tonic::Status> {
    client.put(put("cache", key, b"over tls", 0)).await?;
    Ok(client
        .get(get("cache", key))
        .await?
        .into_inner()
        .value
        .to_vec())
}

/// The subject CN of the certificate the server at `addr` presents to a
/// new TLS connection.
async fn served_common_name(addr: SocketAddr, pki: &Pki, alpn: &[u8]) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pki.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (_, session) = tls.get_ref();
    let cert = &session.peer_certificates().unwrap()[0];
    prism::tls::cert_common_name(cert).unwrap()
}

use rustls_pki_types::pem::PemObject as _;

// ---------------------------------------------------------------------------
// The listeners

#[tokio::test]
async fn grpc_and_the_admin_plane_serve_tls() {
    let pki = Pki::new("test ca");
    let server = pki.server("server", "gateway");
    let gw = common::TestServer::start(settings(&pki.section(&server, false)))
        .await
        .unwrap();
    assert!(gw.url().starts_with("https://"), "{}", gw.url());

    let mut client = grpc_client(gw.addr, &pki, None).await.unwrap();
    assert_eq!(
        grpc_round_trip(&mut client, "tls").await.unwrap(),
        b"over tls"
    );

    let https = https_client(&pki, None);
    let ready = https
        .get(format!("{}/healthz", gw.http_url()))
        .send()
        .await
        .unwrap();
    assert!(ready.status().is_success(), "{}", ready.status());
    let value = https
        .get(format!("{}/v1/kv/cache/tls", gw.http_url()))
        .send()
        .await
        .unwrap();
    assert!(value.status().is_success(), "{}", value.status());
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn plaintext_clients_are_refused_by_a_tls_gateway() {
    let pki = Pki::new("test ca");
    let server = pki.server("server", "gateway");
    let gw = common::TestServer::start(settings(&pki.section(&server, false)))
        .await
        .unwrap();

    let plain = async {
        let mut client = common::requests::connect(gw.addr).await?;
        client.get(get("cache", "k")).await?;
        anyhow::Ok(())
    };
    let refused = tokio::time::timeout(Duration::from_secs(15), plain)
        .await
        .expect("a plaintext gRPC client is answered or dropped in time");
    assert!(refused.is_err(), "a plaintext gRPC call was served");

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let plain = http
        .get(format!("http://{}/healthz", gw.http_addr))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.as_ref().unwrap().status().is_success(),
        "plaintext HTTP was served: {plain:?}"
    );
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn with_client_ca_only_clients_with_a_certificate_it_signed_are_served() {
    let pki = Pki::new("test ca");
    let server = pki.server("server", "gateway");
    let client_cert = pki.client("client", "billing");
    let stranger_pki = Pki::new("other ca");
    let stranger = stranger_pki.client("stranger", "billing");
    let gw = common::TestServer::start(settings(&pki.section(&server, true)))
        .await
        .unwrap();

    // gRPC: the handshake, and so the connection or the first call, fails.
    for (who, identity) in [("no certificate", None), ("another CA's", Some(&stranger))] {
        let call = async {
            let mut client = grpc_client(gw.addr, &pki, identity).await?;
            client.get(get("cache", "k")).await?;
            anyhow::Ok(())
        };
        let refused = tokio::time::timeout(Duration::from_secs(15), call)
            .await
            .expect("answered in time");
        assert!(refused.is_err(), "grpc client with {who} was served");
    }
    let mut client = grpc_client(gw.addr, &pki, Some(&client_cert))
        .await
        .unwrap();
    assert_eq!(
        grpc_round_trip(&mut client, "mtls").await.unwrap(),
        b"over tls"
    );

    // HTTPS.
    let live = format!("{}/healthz", gw.http_url());
    for (who, identity) in [("no certificate", None), ("another CA's", Some(&stranger))] {
        let answer = https_client(&pki, identity).get(&live).send().await;
        assert!(
            answer.is_err(),
            "https client with {who} was served: {answer:?}"
        );
    }
    let answer = https_client(&pki, Some(&client_cert))
        .get(&live)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    gw.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// The client's common name on the request path

/// A KeyValue service whose Get answers with the caller's common name.
struct WhoAmI;

#[tonic::async_trait]
impl KeyValue for WhoAmI {
    async fn get(
        &self,
        request: tonic::Request<GetRequest>,
    ) -> Result<tonic::Response<GetResponse>, tonic::Status> {
        let cn = prism::tls::peer_common_name(&request)
            .ok_or_else(|| tonic::Status::unauthenticated("no client certificate"))?;
        Ok(tonic::Response::new(GetResponse {
            found: true,
            value: cn.0.into_bytes().into(),
            ttl_ms: -1,
        }))
    }
    async fn put(
        &self,
        _: tonic::Request<PutRequest>,
    ) -> Result<tonic::Response<PutResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test service"))
    }
    async fn delete(
        &self,
        _: tonic::Request<DeleteRequest>,
    ) -> Result<tonic::Response<DeleteResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test service"))
    }
    async fn exists(
        &self,
        _: tonic::Request<ExistsRequest>,
    ) -> Result<tonic::Response<ExistsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test service"))
    }
    async fn scan(
        &self,
        _: tonic::Request<ScanRequest>,
    ) -> Result<tonic::Response<ScanResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test service"))
    }
}

async fn whoami_rest(req: actix_web::HttpRequest) -> actix_web::HttpResponse {
    match req.conn_data::<PeerCommonName>() {
        Some(cn) => actix_web::HttpResponse::Ok().body(cn.0.clone()),
        None => actix_web::HttpResponse::Unauthorized().finish(),
    }
}

#[tokio::test]
async fn the_client_common_name_reaches_grpc_and_rest_handlers() {
    let pki = Pki::new("test ca");
    let server = pki.server("server", "gateway");
    let client_cert = pki.client("client", "billing-service");
    let certs = ServerCerts::load(CertFiles {
        cert: server.cert.clone(),
        key: server.key.clone(),
        client_ca: Some(pki.ca_path()),
    })
    .unwrap();

    // gRPC, through the gateway's TLS acceptor.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = listener.local_addr().unwrap();
    let incoming = prism::tls::TlsIncoming::new(listener, &certs);
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(KeyValueServer::new(WhoAmI))
            .serve_with_incoming(incoming),
    );
    let mut client = grpc_client(grpc_addr, &pki, Some(&client_cert))
        .await
        .unwrap();
    let answer = client.get(get("any", "k")).await.unwrap().into_inner();
    assert_eq!(answer.value.as_ref(), b"billing-service");
    grpc.abort();

    // REST, with the admin plane's connection hook.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_addr = listener.local_addr().unwrap();
    let http = actix_web::HttpServer::new(|| {
        actix_web::App::new().route("/whoami", actix_web::web::get().to(whoami_rest))
    })
    .workers(1)
    .disable_signals()
    .on_connect(prism::tls::stash_peer_common_name)
    .listen_rustls_0_23(listener, certs.http_config())
    .unwrap()
    .run();
    let handle = http.handle();
    let task = tokio::spawn(http);
    let body = https_client(&pki, Some(&client_cert))
        .get(format!("https://localhost:{}/whoami", http_addr.port()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "billing-service");
    handle.stop(false).await;
    let _ = task.await;
}

// ---------------------------------------------------------------------------
// Reload

#[tokio::test]
async fn a_reload_serves_the_new_certificate_to_new_connections() {
    let pki = Pki::new("test ca");
    let first = pki.server("server", "first");
    let settings = settings(&pki.section(&first, false));
    let tls = settings.server.tls.clone().expect("tls settings");
    let gw = common::TestServer::start(settings).await.unwrap();
    assert_eq!(served_common_name(gw.addr, &pki, b"h2").await, "first");
    assert_eq!(
        served_common_name(gw.http_addr, &pki, b"http/1.1").await,
        "first"
    );
    let mut open = grpc_client(gw.addr, &pki, None).await.unwrap();

    // The same paths, new contents.
    pki.server("server", "second");
    tls.reload().unwrap();
    assert_eq!(served_common_name(gw.addr, &pki, b"h2").await, "second");
    assert_eq!(
        served_common_name(gw.http_addr, &pki, b"http/1.1").await,
        "second"
    );
    // A connection made before the reload keeps working.
    assert_eq!(
        grpc_round_trip(&mut open, "before").await.unwrap(),
        b"over tls"
    );

    // A broken file is not taken: the certificate in use stays.
    std::fs::write(&first.key, "not a key").unwrap();
    let err = tls.reload().unwrap_err();
    assert_eq!(err.key(), "server.tls.key");
    assert_eq!(served_common_name(gw.addr, &pki, b"h2").await, "second");
    gw.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Settings

#[test]
fn unusable_tls_files_are_settings_errors_naming_key_and_file() {
    let pki = Pki::new("test ca");
    let server = pki.server("server", "gateway");
    let other = pki.server("other", "gateway");
    let section = |cert: &Path, key: &Path| {
        format!(
            "[server.tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        )
    };
    let toml = |extra: &str| {
        format!("[server]\ngrpc_addr = \"127.0.0.1:0\"\n[backends.m]\nkind = \"memory\"\n[namespaces.cache]\nbackend = \"m\"\n{extra}")
    };

    let mismatched = Settings::from_toml(&toml(&section(&server.cert, &other.key))).unwrap_err();
    assert_eq!(mismatched.key(), Some("server.tls.key"), "{mismatched}");
    let text = mismatched.to_string();
    assert!(
        text.contains("other.key") && text.contains("does not match"),
        "{text}"
    );

    let missing = pki.dir.path().join("missing.pem");
    let unreadable = Settings::from_toml(&toml(&section(&missing, &server.key))).unwrap_err();
    assert_eq!(unreadable.key(), Some("server.tls.cert"), "{unreadable}");
    assert!(
        unreadable.to_string().contains("missing.pem"),
        "{unreadable}"
    );

    let garbage = pki.write("garbage.pem", "no pem here");
    let unparsable = Settings::from_toml(&toml(&section(&garbage, &server.key))).unwrap_err();
    assert_eq!(unparsable.key(), Some("server.tls.cert"), "{unparsable}");

    let ca = format!(
        "{}client_ca = {:?}\n",
        section(&server.cert, &server.key),
        garbage.display().to_string()
    );
    let bad_ca = Settings::from_toml(&toml(&ca)).unwrap_err();
    assert_eq!(bad_ca.key(), Some("server.tls.client_ca"), "{bad_ca}");

    let ok = Settings::from_toml(&toml(&section(&server.cert, &server.key))).unwrap();
    assert!(ok.server.tls.is_some());
}

#[test]
fn the_binary_exits_64_on_a_key_that_does_not_match_its_certificate() {
    let pki = Pki::new("test ca");
    let server = pki.server("server", "gateway");
    let other = pki.server("other", "gateway");
    let dir = common::settings_dir(&format!(
        "[server]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n[backends.m]\nkind = \"memory\"\n[namespaces.cache]\nbackend = \"m\"\n[server.tls]\ncert = {:?}\nkey = {:?}\n",
        server.cert.display().to_string(),
        other.key.display().to_string()
    ));
    let out = common::binary::run(common::binary::serve_command(dir.path()).stderr(Stdio::piped()));
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        common::binary::stderr(&out)
    );
    let stderr = common::binary::stderr(&out);
    assert!(
        stderr.contains("server.tls.key") && stderr.contains("other.key"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------
// Backends over TLS, passwords from the environment and from files

/// Whether the local PostgreSQL serves TLS; prints why not.
async fn postgres_has_ssl(url: &str) -> bool {
    use sqlx::Connection as _;
    let mut conn = match sqlx::PgConnection::connect(url).await {
        Ok(c) => c,
        Err(e) => {
            println!("skipped: cannot connect to postgres at {url}: {e}");
            return false;
        }
    };
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    if ssl != "on" {
        println!("skipped: the postgres server has ssl = {ssl}; turn ssl on to test TLS to it");
        return false;
    }
    true
}

#[tokio::test]
async fn postgres_connections_use_tls_with_sslmode_require() {
    use prism::backend::postgres::{PostgresConfig, PostgresConnector};
    use prism::backend::Connector as _;
    let base = common::db::postgres_url();
    if !postgres_has_ssl(&base).await {
        return;
    }
    let table = common::db::unique_name("tls");
    let app = common::db::unique_name("prism_tls");
    let _cleanup = {
        let (base, table) = (base.clone(), table.clone());
        prism::testing::Cleanup::new(move || async move {
            common::db::drop_table(&base, &table).await;
        })
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    let connector = PostgresConnector::new(PostgresConfig {
        url: format!("{base}{sep}sslmode=require"),
        table: table.clone(),
        application_name: app.clone(),
        min_connections: 1,
        ..PostgresConfig::default()
    })
    .unwrap();
    let backend = connector.connect().await.unwrap();
    let pool = common::db::bounded_pool(&base).await.unwrap();
    let ssl: Vec<bool> = sqlx::query_scalar(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
    )
    .bind(&app)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(!ssl.is_empty(), "no connection of the connector found");
    assert!(ssl.iter().all(|s| *s), "a connection without tls: {ssl:?}");
    drop(backend);

    // verify-full with the server's own (self-signed) certificate as the
    // root, where the test can read it and it names localhost (Debian's
    // snakeoil certificate does).
    let cert_file: String = sqlx::query_scalar("SHOW ssl_cert_file")
        .fetch_one(&pool)
        .await
        .unwrap();
    let local = base.replacen("@127.0.0.1:", "@localhost:", 1);
    let server_cert = std::fs::read(&cert_file)
        .ok()
        .and_then(|pem| rustls_pki_types::CertificateDer::from_pem_slice(&pem).ok());
    let names_localhost = server_cert
        .as_ref()
        .and_then(|der| prism::tls::cert_common_name(der))
        .is_some_and(|cn| cn == "localhost");
    if names_localhost && local != base {
        let verified = PostgresConnector::new(PostgresConfig {
            url: format!("{local}{sep}sslmode=verify-full&sslrootcert={cert_file}"),
            table: table.clone(),
            ..PostgresConfig::default()
        })
        .unwrap();
        if let Err(e) = verified.connect().await {
            panic!("verify-full with the server's certificate {cert_file} as root: {e}");
        }
    } else {
        println!(
            "not tested: verify-full (the server's certificate {cert_file} is unreadable or does not name localhost)"
        );
    }

    // verify-full against a CA that did not sign the server's certificate.
    let pki = Pki::new("not the server's ca");
    let strict = PostgresConnector::new(PostgresConfig {
        url: format!(
            "{base}{sep}sslmode=verify-full&sslrootcert={}",
            pki.ca_path().display()
        ),
        table,
        ..PostgresConfig::default()
    })
    .unwrap();
    assert!(
        strict.connect().await.is_err(),
        "verify-full accepted a certificate its CA did not sign"
    );
    pool.close().await;
}

#[tokio::test]
async fn backend_urls_and_passwords_come_from_the_environment_and_files() {
    let base = common::db::postgres_url();
    let table = common::db::unique_name("tls_env");
    let dir = common::settings_dir(&format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
shutdown_grace = "10s"
drain_delay = "0s"

[backends.pg]
kind = "postgres"
url = "postgres://nobody@127.0.0.1:1/none"
table = "{table}"

[namespaces.cache]
backend = "pg"
"#
    ));
    // The environment's URL wins, and its password never shows.
    let env_url = base.replacen("postgres://postgres@", "postgres://postgres:hunter2@", 1);
    let settings = prism::settings::load_with(
        dir.path(),
        None,
        vec![("PRISM__BACKENDS__PG__URL".to_owned(), env_url.clone())],
    )
    .unwrap();
    let debug = format!("{settings:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    let _cleanup = {
        let (base, table) = (base.clone(), table.clone());
        prism::testing::Cleanup::new(move || async move {
            common::db::drop_table(&base, &table).await;
        })
    };
    let gw = common::TestServer::start(settings).await.unwrap();
    let mut client = gw.client().await.unwrap();
    client.put(put("cache", "k", b"v", 0)).await.unwrap();
    gw.stop().await.unwrap();

    // A password file: read, trimmed, put in the URL, never shown.
    let secret = dir.path().join("pg.password");
    std::fs::write(&secret, "s3cret-from-file\n").unwrap();
    let with_file = |file: &Path| {
        format!(
            "[server]\ngrpc_addr = \"127.0.0.1:0\"\n[backends.pg]\nkind = \"postgres\"\nurl = {:?}\npassword_file = {:?}\n[namespaces.cache]\nbackend = \"pg\"\n",
            base,
            file.display().to_string()
        )
    };
    let settings = Settings::from_toml(&with_file(&secret)).unwrap();
    let debug = format!("{settings:?}");
    assert!(!debug.contains("s3cret"), "{debug}");
    let missing = Settings::from_toml(&with_file(&dir.path().join("nope"))).unwrap_err();
    assert_eq!(
        missing.key(),
        Some("backends.pg.password_file"),
        "{missing}"
    );
}

/// A Redis server of the test's own serving TLS only, with a password;
/// killed on drop.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsRedis {
    /// `None`, with the reason printed, when no TLS-capable redis-server
    /// can be started here.
    async fn start(pki: &Pki, password: &str) -> Option<TlsRedis> {
        let server = pki.server("redis", "redis");
        let port = common::free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&server.cert)
            .arg("--tls-key-file")
            .arg(&server.key)
            .arg("--tls-ca-cert-file")
            .arg(pki.ca_path())
            .args(["--tls-auth-clients", "no", "--requirepass", password])
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(pki.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut redis = match child {
            Ok(child) => TlsRedis { child, port },
            Err(e) => {
                println!("skipped: cannot run redis-server: {e}");
                return None;
            }
        };
        let up = prism::testing::eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        if !up {
            let status = redis.child.try_wait().ok().flatten();
            println!(
                "skipped: redis-server with --tls-port did not start ({status:?}); it may be built without TLS"
            );
            return None;
        }
        Some(redis)
    }
}

#[tokio::test]
async fn redis_is_reached_over_tls_with_a_password_file() {
    let pki = Pki::new("redis ca");
    let Some(redis) = TlsRedis::start(&pki, "pw-from-file").await else {
        return;
    };
    let password = pki.write("redis.password", "pw-from-file\n");
    let dir = common::settings_dir(&format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "10s"
drain_delay = "0s"

[log]
format = "json"

[backends.cache]
kind = "redis"
url = "rediss://localhost:{}"
password_file = {:?}
key_prefix = "tls"

[namespaces.cache]
backend = "cache"
"#,
        redis.port,
        password.display().to_string()
    ));
    // The Redis client trusts the system's roots, which SSL_CERT_FILE
    // replaces; the binary gets it so this process's environment stays.
    let mut cmd = common::binary::serve_command(dir.path());
    cmd.env("SSL_CERT_FILE", pki.ca_path());
    let mut prism = Prism::spawn(cmd);
    let addr = prism.grpc_addr().await;
    let mut client = common::requests::connect(addr).await.unwrap();
    let served = prism::testing::eventually(STARTUP, || {
        let mut client = client.clone();
        async move { client.put(put("cache", "k", b"tls", 0)).await.is_ok() }
    })
    .await;
    assert!(served, "no put over rediss; log:\n{}", prism.log_text());
    let value = client.get(get("cache", "k")).await.unwrap().into_inner();
    assert_eq!(value.value.as_ref(), b"tls");
    assert!(
        !prism.log_text().contains("pw-from-file"),
        "the password was logged"
    );
    prism.signal(common::binary::Signal::Term);
    prism.wait_exit(Duration::from_secs(30)).await;
}

// ---------------------------------------------------------------------------
// Client certificates as principals

#[tokio::test]
async fn a_client_certificate_common_name_is_its_principal() {
    let pki = Pki::new("test ca");
    let server = pki.server("server", "gateway");
    let orders = pki.client("orders", "orders-service");
    let other = pki.client("other", "someone-else");
    let auth = r#"
[auth]
mode = "token"

[auth.principals.orders]
client_cert_cn = "orders-service"
read = ["cache"]
"#;
    let gw =
        common::TestServer::start(settings(&format!("{}\n{auth}", pki.section(&server, true))))
            .await
            .unwrap();

    // gRPC: the certificate alone authenticates; its grants apply.
    let mut client = grpc_client(gw.addr, &pki, Some(&orders)).await.unwrap();
    let got = client.get(get("cache", "k")).await.expect("orders reads");
    assert!(!got.into_inner().found);
    let e = client.put(put("cache", "k", b"v", 0)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let mut stranger = grpc_client(gw.addr, &pki, Some(&other)).await.unwrap();
    let e = stranger.get(get("cache", "k")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // REST: the same principal.
    let url = format!("{}/v1/kv/cache/k", gw.http_url());
    let r = https_client(&pki, Some(&orders))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        reqwest::StatusCode::NOT_FOUND,
        "key missing, but allowed"
    );
    let r = https_client(&pki, Some(&orders))
        .put(&url)
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::FORBIDDEN);
    let r = https_client(&pki, Some(&other))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    gw.stop().await.unwrap();
}
