//! The gateway addresses of [`ClientOptions::addr`](super::ClientOptions):
//! one address or a comma-separated list, checked as a whole, and the
//! endpoints (plain or TLS) made from them.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::{error_chain, ClientOptions, Error};

/// One gateway address of a list, normalized (`http://host:port` or
/// `https://host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The URI the endpoint is made of.
    pub uri: String,
    /// `https://`: the connection is TLS.
    pub tls: bool,
}

/// `host:port` → `http://host:port`; URIs with a scheme are kept.
pub fn normalize_addr(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// Parses an address list: `a`, or `a,b,c` (spaces around elements are
/// ignored). Every element must be `http://host:port`, `https://host:port`
/// or `host:port` (plain HTTP); a list may not mix plain and TLS addresses,
/// name one instance twice, or have an empty element.
pub fn parse_list(list: &str) -> Result<Vec<Address>, Error> {
    let mut addresses: Vec<Address> = Vec::new();
    let mut seen: Vec<(String, &str)> = Vec::new();
    for (i, element) in list.split(',').map(str::trim).enumerate() {
        if element.is_empty() {
            return Err(Error::Address {
                addr: list.to_owned(),
                message: format!(
                    "element {} of the address list is empty; separate addresses with single commas",
                    i + 1
                ),
            });
        }
        let uri = normalize_addr(element);
        let tls = check_scheme(&uri)?;
        let parsed = Endpoint::from_shared(uri.clone()).map_err(|e| Error::Address {
            addr: element.to_owned(),
            message: error_chain(&e),
        })?;
        let parsed = parsed.uri();
        // Scheme and authority name the instance: `HTTP://Host:1` is `http://host:1`.
        let identity = format!(
            "{}://{}",
            parsed.scheme_str().unwrap_or_default(),
            parsed.authority().map_or("", |a| a.as_str())
        )
        .to_ascii_lowercase();
        if let Some((_, first)) = seen.iter().find(|(id, _)| *id == identity) {
            return Err(Error::Address {
                addr: element.to_owned(),
                message: format!("names the same instance as {first:?}: list every instance once"),
            });
        }
        if let Some(first) = addresses.first() {
            if first.tls != tls {
                return Err(Error::Address {
                    addr: element.to_owned(),
                    message: format!(
                        "a list may not mix http:// and https:// addresses ({:?} is {})",
                        first.uri,
                        if first.tls { "https://" } else { "http://" }
                    ),
                });
            }
        }
        seen.push((identity, element));
        addresses.push(Address { uri, tls });
    }
    Ok(addresses)
}

/// Only `http://` and `https://` are spoken; tells whether `addr` is TLS.
pub(super) fn check_scheme(addr: &str) -> Result<bool, Error> {
    let scheme = addr.split_once("://").map_or("", |(scheme, _)| scheme);
    if scheme.eq_ignore_ascii_case("http") {
        return Ok(false);
    }
    if scheme.eq_ignore_ascii_case("https") {
        return Ok(true);
    }
    Err(Error::Address {
        addr: addr.to_owned(),
        message: format!(
            "the scheme {scheme:?} is not supported; use http://host:port or https://host:port"
        ),
    })
}

/// The endpoint of `address`, with the TLS configuration of `options` when
/// it is `https://`.
pub(super) fn endpoint(address: &Address, options: &ClientOptions) -> Result<Endpoint, Error> {
    let endpoint = Endpoint::from_shared(address.uri.clone()).map_err(|e| Error::Address {
        addr: address.uri.clone(),
        message: error_chain(&e),
    })?;
    let endpoint = endpoint
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true);
    if !address.tls {
        if options.ca.is_some() || options.cert.is_some() {
            return Err(Error::Tls(format!(
                "a CA bundle or client certificate is given, but {} is not an https:// address",
                address.uri
            )));
        }
        return Ok(endpoint);
    }
    endpoint
        .tls_config(tls_config(options)?)
        .map_err(|e| Error::Tls(error_chain(&e)))
}

/// The TLS configuration of `options`: its CA bundle (else the webpki
/// roots) and its client certificate.
fn tls_config(options: &ClientOptions) -> Result<ClientTlsConfig, Error> {
    let mut tls = ClientTlsConfig::new().timeout(options.connect_timeout);
    tls = match &options.ca {
        Some(path) => {
            let pem = read_pem(path, "CA bundle", "CERTIFICATE")?;
            tls.ca_certificate(Certificate::from_pem(pem))
        }
        None => tls.with_webpki_roots(),
    };
    match (&options.cert, &options.key) {
        (Some(cert), Some(key)) => {
            let cert = read_pem(cert, "client certificate", "CERTIFICATE")?;
            let key = read_pem(key, "client key", "PRIVATE KEY")?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::Tls(
                "a client certificate and its key go together: give both or neither".into(),
            ))
        }
    }
    Ok(tls)
}

/// The PEM file at `path`, which must hold a `-----BEGIN ...{label}-----`
/// block.
fn read_pem(path: &Path, what: &str, label: &str) -> Result<String, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Tls(format!("cannot read the {what} {}: {e}", path.display())))?;
    let has_block = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")));
    if !has_block {
        return Err(Error::Tls(format!(
            "the {what} {} holds no PEM {label}",
            path.display()
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fails(list: &str, element: &str, expected: &str) {
        let e = parse_list(list).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(&format!("{element:?}")), "{list}: {text}");
        assert!(text.contains(expected), "{list}: {text}");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn one_address_is_a_list_of_one() {
        let list = parse_list("127.0.0.1:8980").unwrap();
        assert_eq!(
            list,
            [Address {
                uri: "http://127.0.0.1:8980".into(),
                tls: false
            }]
        );
        assert!(parse_list("https://kv.example:443").unwrap()[0].tls);
    }

    #[test]
    fn lists_are_split_on_commas_and_normalized() {
        let list = parse_list("127.0.0.1:1, http://127.0.0.1:2,HTTP://127.0.0.1:3").unwrap();
        let uris: Vec<&str> = list.iter().map(|a| a.uri.as_str()).collect();
        assert_eq!(
            uris,
            [
                "http://127.0.0.1:1",
                "http://127.0.0.1:2",
                "HTTP://127.0.0.1:3"
            ]
        );
    }

    #[test]
    fn bad_lists_name_the_bad_element() {
        fails(
            "a:1,,b:2",
            "a:1,,b:2",
            "element 2 of the address list is empty",
        );
        fails("a:1,", "a:1,", "element 2");
        fails("a:1,b:2,A:1", "A:1", "same instance as \"a:1\"");
        fails(
            "http://a:1,http://A:1",
            "http://A:1",
            "same instance as \"http://a:1\"",
        );
        fails(
            "a:1,https://b:2",
            "https://b:2",
            "may not mix http:// and https://",
        );
        fails("a:1,ftp://b:2", "ftp://b:2", "\"ftp\" is not supported");
    }

    #[test]
    fn only_http_and_https_are_spoken() {
        assert!(!check_scheme("http://127.0.0.1:8980").unwrap());
        assert!(!check_scheme("HTTP://127.0.0.1:8980").unwrap());
        assert!(check_scheme("https://kv.example:443").unwrap());
        let e = check_scheme("ftp://kv.example").unwrap_err();
        assert!(e.to_string().contains("\"ftp\" is not supported"), "{e}");
    }

    #[test]
    fn tls_files_are_checked_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let https = &parse_list("https://127.0.0.1:1").unwrap()[0];
        let http = &parse_list("127.0.0.1:1").unwrap()[0];
        let with = |ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>| ClientOptions {
            ca: ca.map(Path::to_path_buf),
            cert: cert.map(Path::to_path_buf),
            key: key.map(Path::to_path_buf),
            ..ClientOptions::default()
        };
        let e = endpoint(https, &with(Some(&junk), None, None)).unwrap_err();
        assert!(e.to_string().contains("holds no PEM CERTIFICATE"), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = endpoint(https, &with(Some(&missing), None, None)).unwrap_err();
        assert!(e.to_string().contains("cannot read the CA bundle"), "{e}");
        let e = endpoint(https, &with(None, Some(&junk), None)).unwrap_err();
        assert!(e.to_string().contains("give both or neither"), "{e}");
        let e = endpoint(http, &with(Some(&junk), None, None)).unwrap_err();
        assert!(e.to_string().contains("not an https:// address"), "{e}");
        assert!(endpoint(https, &ClientOptions::default()).is_ok());
    }
}
