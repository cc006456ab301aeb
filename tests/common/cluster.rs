//! A Redis Cluster of a test's own: three masters with one replica each, on
//! free loopback ports (each with its cluster bus port, port + 10000, free
//! too), in a temp dir, with append-only files synced on every write.
//!
//! [`ThrowawayCluster::start`] gives a cluster the test owns: its nodes are
//! killed when it is dropped, also when the test fails. [`shared`] gives one
//! cluster for every test of the process (the conformance suite makes one
//! subject per check, and a cluster takes seconds to form): a watchdog
//! process kills its nodes and removes its folder when the test process
//! exits, since a `static` is never dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

/// Masters, and replicas per master.
const MASTERS: usize = 3;
const REPLICAS: usize = 1;

/// One `redis-server` of the cluster.
struct Node {
    port: u16,
    child: Option<Child>,
}

pub struct ThrowawayCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl ThrowawayCluster {
    /// Starts the nodes, joins them into a cluster and waits until every
    /// node reports `cluster_state:ok`. Blocking: it runs external commands
    /// and waits for them.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("prism-cluster-")
            .tempdir()
            .context("tempdir")?;
        let ports = free_port_pairs(MASTERS * (1 + REPLICAS))?;
        let mut cluster = ThrowawayCluster {
            dir,
            nodes: Vec::new(),
        };
        for port in ports {
            let child = spawn_node(cluster.dir.path(), port)?;
            cluster.nodes.push(Node {
                port,
                child: Some(child),
            });
        }
        for node in &cluster.nodes {
            wait_for(Duration::from_secs(10), || {
                cli(node.port, &["PING"]).is_ok_and(|out| out.trim() == "PONG")
            })
            .with_context(|| format!("redis node {} did not start", node.port))?;
        }
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create.args(["--cluster-replicas", &REPLICAS.to_string(), "--cluster-yes"]);
        let out = create
            .stdin(Stdio::null())
            .output()
            .context("run redis-cli --cluster create")?;
        ensure!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_until_ok(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Waits until every running node says `cluster_state:ok`, every
    /// replica has synced with its master, and the cluster has [`MASTERS`] masters, all of them running (after a kill:
    /// a replica has taken over).
    pub fn wait_until_ok(&self, patience: Duration) -> anyhow::Result<()> {
        wait_for(patience, || {
            self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                cli(n.port, &["CLUSTER", "INFO"])
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
                    // A replica that has not synced yet cannot take over
                    // from its master.
                    && cli(n.port, &["INFO", "replication"]).is_ok_and(|info| {
                        info.contains("role:master") || info.contains("master_link_status:up")
                    })
            }) && self.masters().is_ok_and(|m| {
                // A killed master counts until the others mark it failed.
                m.len() == MASTERS
                    && m.iter()
                        .all(|p| self.nodes.iter().any(|n| n.port == *p && n.child.is_some()))
            })
        })
        .context("the redis cluster did not reach cluster_state:ok")
    }

    /// Seed URLs: every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The ports of the masters that are up, as a running node sees them.
    pub fn masters(&self) -> anyhow::Result<Vec<u16>> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .context("no node is running")?;
        let nodes = cli(node.port, &["CLUSTER", "NODES"])?;
        let mut masters = Vec::new();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
                continue;
            };
            if flags.contains("master") && !flags.contains("fail") {
                let port = addr
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .with_context(|| format!("bad CLUSTER NODES line {line:?}"))?;
                masters.push(port);
            }
        }
        masters.sort_unstable();
        Ok(masters)
    }

    /// Kills one node with SIGKILL.
    pub fn kill(&mut self, port: u16) -> anyhow::Result<()> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .context("no such node")?;
        let mut child = node.child.take().context("node is not running")?;
        child.kill().context("kill redis node")?;
        child.wait().context("wait for redis node")?;
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(Child::id))
            .collect()
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The cluster every test of this process may share (each with a key
/// prefix of its own). Started on first use; its nodes die with the test
/// process.
pub fn shared() -> &'static ThrowawayCluster {
    static SHARED: OnceLock<ThrowawayCluster> = OnceLock::new();
    SHARED.get_or_init(|| {
        let cluster = ThrowawayCluster::start().expect("start a throwaway redis cluster");
        watch_over(&cluster).expect("start the cluster's watchdog");
        cluster
    })
}

/// Starts a watchdog that kills the cluster's nodes and removes its folder
/// once this process has exited.
fn watch_over(cluster: &ThrowawayCluster) -> anyhow::Result<()> {
    let pids: Vec<String> = cluster.pids().iter().map(u32::to_string).collect();
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill -9 {pids} 2>/dev/null; rm -rf '{dir}'",
        me = std::process::id(),
        pids = pids.join(" "),
        dir = cluster.path().display(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn the watchdog")?;
    Ok(())
}

fn spawn_node(dir: &Path, port: u16) -> anyhow::Result<Child> {
    let node_dir: PathBuf = dir.join(port.to_string());
    std::fs::create_dir_all(&node_dir).context("node dir")?;
    Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
        // A short node timeout makes failover quick in the fault test.
        .args(["--cluster-node-timeout", "1000"])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(&node_dir)
        .arg("--logfile")
        .arg(node_dir.join("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn redis-server (is it installed?)")
}

/// `redis-cli -p port args...`, its standard output.
pub fn cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run redis-cli")?;
    ensure!(out.status.success(), "redis-cli {args:?} failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for(patience: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + patience;
    while !ready() {
        if Instant::now() >= deadline {
            bail!("gave up after {patience:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `n` ports that are free, each with its cluster bus port (+10000) free
/// too. Chosen from 10000..22000, so that neither the port nor its bus port
/// is in Linux's ephemeral range (32768 and up), where an outgoing
/// connection could take it between this check and the server's bind;
/// starting at a point of this process's own.
fn free_port_pairs(n: usize) -> anyhow::Result<Vec<u16>> {
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Clusters started at once by one process begin at different points.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let start = CALLS.fetch_add(1, Ordering::Relaxed) * 997
        + (std::process::id() as usize).wrapping_mul(7919)
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize);
    let mut ports = Vec::new();
    for i in 0..10_000 {
        let port = 10_000 + ((start + i * 13) % 12_000) as u16;
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if !ports.contains(&port) && free(port) && free(port + 10_000) {
            ports.push(port);
            if ports.len() == n {
                return Ok(ports);
            }
        }
    }
    bail!("found no {n} free port pairs")
}
