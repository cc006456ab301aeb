//! PostgreSQL and Redis servers of a test's own, on free loopback ports, so
//! that stopping them never disturbs the shared servers or tests running in
//! parallel.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use deadpool_redis::redis as redis_client;

use super::{eventually, free_port};

/// A backend server the test may stop and start.
pub trait Throwaway {
    /// Stops the server hard: acknowledged writes must survive this.
    async fn stop(&mut self) -> anyhow::Result<()>;
    /// Starts the stopped server again on the same port and data.
    async fn start_again(&mut self) -> anyhow::Result<()>;
}

/// Runs a blocking command to its end; fails with its output unless it
/// succeeded.
async fn run_checked(mut cmd: Command) -> anyhow::Result<()> {
    let what = format!("{cmd:?}");
    let out = tokio::task::spawn_blocking(move || cmd.stdin(Stdio::null()).output())
        .await
        .context("command task")?
        .with_context(|| format!("run {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A PostgreSQL cluster of its own in a temp dir, on a free port. Stopped
/// and removed on drop, also when the test fails.
pub struct ThrowawayPostgres {
    bin: PathBuf,
    /// Holds everything; removed last.
    dir: tempfile::TempDir,
    port: u16,
}

impl ThrowawayPostgres {
    pub async fn start() -> anyhow::Result<Self> {
        let bin = postgres_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("prism-outage-pg-")
            .tempdir()
            .context("tempdir")?;
        // initdb and postgres refuse to run as root: as root, they run as
        // `postgres`, which must be able to reach and own its directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let home = dir.path().join("pg");
        std::fs::create_dir(&home)?;
        if is_root() {
            let (uid, gid) = postgres_ids()?;
            std::os::unix::fs::chown(&home, Some(uid), Some(gid)).context("chown")?;
        }
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))?;
        let pg = ThrowawayPostgres {
            bin,
            dir,
            port: free_port(),
        };
        let mut initdb = pg.command("initdb");
        initdb.arg("-D").arg(pg.data()).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-locale",
            "-E",
            "UTF8",
        ]);
        run_checked(initdb).await?;
        pg.pg_ctl_start().await?;
        Ok(pg)
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("pg")
    }

    fn data(&self) -> PathBuf {
        self.home().join("data")
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        // The test's own directory may be closed to `postgres`.
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn stop_command(&self) -> Command {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w"]);
        cmd
    }

    async fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("start")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.home().join("server.log"))
            .args(["-w", "-t", "30", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on",
                self.port,
                self.home().display()
            ));
        run_checked(cmd).await
    }
}

impl ThrowawayPostgres {
    /// Kills the server (SIGKILL) so that its listening socket is gone
    /// before any of its connections breaks: `processes` (its children) are
    /// frozen first, then the postmaster dies, then they do.
    pub async fn kill(&self, processes: &[i32]) -> anyhow::Result<()> {
        let pid_file = self.data().join("postmaster.pid");
        let pids = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("read {}", pid_file.display()))?;
        let postmaster = pids
            .lines()
            .next()
            .context("empty postmaster.pid")?
            .trim()
            .to_owned();
        // Only this server's own children: a process that ended since it
        // was listed may have left its pid to an unrelated one, which must
        // never be frozen.
        let children: Vec<String> = processes
            .iter()
            .filter(|pid| parent_of(**pid).is_some_and(|p| p.to_string() == postmaster))
            .map(i32::to_string)
            .collect();
        // Some children may have ended already: kill's status is ignored.
        let signal = |sig: &str, pids: &[String]| {
            let mut kill = Command::new("kill");
            kill.arg(sig).args(pids);
            run_checked(kill)
        };
        if !children.is_empty() {
            let _ = signal("-STOP", &children).await;
        }
        let killed = signal("-KILL", std::slice::from_ref(&postmaster)).await;
        let addr = format!("127.0.0.1:{}", self.port);
        let gone = eventually(Duration::from_secs(5), || async {
            tokio::net::TcpStream::connect(&addr).await.is_err()
        })
        .await;
        // Frozen children are killed whatever happened above: none may
        // outlive the test.
        if !children.is_empty() {
            let _ = signal("-KILL", &children).await;
        }
        killed?;
        ensure!(gone, "postmaster {postmaster} still accepts connections");
        Ok(())
    }
}

impl Throwaway for ThrowawayPostgres {
    async fn stop(&mut self) -> anyhow::Result<()> {
        run_checked(self.stop_command()).await
    }

    async fn start_again(&mut self) -> anyhow::Result<()> {
        self.pg_ctl_start().await
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        // Already stopped is fine; the temp dir goes when `dir` drops.
        let _ = self
            .stop_command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The parent of process `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the fields
    // after the last ')' are the state, then the parent's pid.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The newest PostgreSQL's binaries.
fn postgres_bin() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .with_context(|| format!("list {}", root.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max_by_key(|(v, _)| *v);
    match newest {
        Some((_, bin)) => Ok(bin),
        None => bail!("no PostgreSQL binaries under {}", root.display()),
    }
}

fn is_root() -> bool {
    // /proc/self belongs to the effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The uid and gid of the `postgres` user.
fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .context("no postgres user")?;
    let fields: Vec<&str> = line.split(':').collect();
    ensure!(fields.len() > 3, "bad passwd line {line}");
    Ok((fields[2].parse()?, fields[3].parse()?))
}

/// A `redis-server` child of its own, with an append-only file synced on
/// every write, on a free port. Killed on drop, also when the test fails.
pub struct ThrowawayRedis {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// More `redis-server` arguments, e.g. `--maxmemory-policy`.
    args: Vec<String>,
}

impl ThrowawayRedis {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    /// A server started with `args` added to its command line (each start).
    pub async fn start_with(args: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("prism-outage-redis-")
            .tempdir()
            .context("tempdir")?;
        let mut redis = ThrowawayRedis {
            dir,
            port: free_port(),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        redis.start_again().await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Answers PING: listening and done loading the append-only file.
    pub async fn ready(&self) -> bool {
        let ping = async {
            let client = redis_client::Client::open(self.url())?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis_client::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Ok(_))
        )
    }
}

impl Throwaway for ThrowawayRedis {
    async fn stop(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("redis is not running")?;
        tokio::task::spawn_blocking(move || {
            // SIGKILL: no chance to flush anything it has not already synced.
            child.kill()?;
            child.wait()
        })
        .await
        .context("kill task")?
        .context("kill redis")?;
        Ok(())
    }

    async fn start_again(&mut self) -> anyhow::Result<()> {
        ensure!(self.child.is_none(), "redis is running");
        let dir = self.dir.path();
        let child = Command::new("redis-server")
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn redis-server")?;
        self.child = Some(child);
        let up = eventually(Duration::from_secs(10), || self.ready()).await;
        ensure!(
            up,
            "redis-server on port {} did not become ready; see {}",
            self.port,
            dir.join("redis.log").display()
        );
        Ok(())
    }
}

impl Drop for ThrowawayRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
