//! The real `prism` binary: run a command to its end, or serve and follow
//! the log on its stderr line by line, signal it and wait for its exit.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long a served binary may take to log that it listens.
pub const STARTUP: Duration = Duration::from_secs(30);

/// The binary, with an environment free of the caller's Prism variables and
/// `RUST_LOG`, and no stdin.
pub fn prism() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prism"));
    for (name, _) in std::env::vars_os() {
        let upper = name.to_string_lossy().to_ascii_uppercase();
        if upper.starts_with("PRISM") || upper == "RUST_LOG" {
            cmd.env_remove(&name);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// `prism serve` on the settings in `settings_dir`.
pub fn serve_command(settings_dir: &Path) -> Command {
    let mut cmd = prism();
    cmd.arg("--settings")
        .arg(settings_dir)
        .arg("serve")
        .stdout(Stdio::null());
    cmd
}

/// Runs `cmd` to its end, blocking the thread: for tests without a runtime.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run prism")
}

/// Runs `cmd` to its end on the blocking pool, so that an in-process
/// gateway on this runtime keeps serving meanwhile.
pub async fn output(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("command task")
        .expect("run prism")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[derive(Debug, Clone, Copy)]
pub enum Signal {
    Term,
    Int,
}

/// One line of the binary's stderr: a JSON event (`log.format = "json"`),
/// a text event, or a plain message such as a settings error.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub text: String,
    json: Option<Value>,
}

impl LogLine {
    fn new(text: String) -> Self {
        let json = serde_json::from_str::<Value>(&text)
            .ok()
            .filter(Value::is_object);
        LogLine { text, json }
    }

    /// The line as JSON, when it is.
    pub fn json(&self) -> Option<&Value> {
        self.json.as_ref()
    }

    /// Whether this is the event `message`: the message of a JSON event,
    /// or a text line that contains it.
    pub fn is(&self, message: &str) -> bool {
        match &self.json {
            Some(v) => v["message"] == message,
            None => self.text.contains(message),
        }
    }

    /// A field of the event: `name` of a JSON event, `name=value` of a
    /// text one.
    pub fn field(&self, name: &str) -> Option<String> {
        match &self.json {
            Some(v) => match &v[name] {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            },
            None => {
                let start = self.text.find(&format!(" {name}="))? + name.len() + 2;
                let value = self.text[start..].split_whitespace().next()?;
                Some(value.trim_matches('"').to_owned())
            }
        }
    }
}

/// A running binary whose stderr is read line by line. Killed on drop.
pub struct Prism {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    log: Vec<LogLine>,
    /// Stderr is closed: the process has exited.
    closed: bool,
}

impl Prism {
    /// `prism serve` on the settings in `settings_dir`.
    pub fn serve(settings_dir: &Path) -> Self {
        Self::spawn(serve_command(settings_dir))
    }

    /// Spawns `cmd` with its stderr piped to the log.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.stderr(Stdio::piped()).spawn().expect("spawn prism");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::unbounded_channel();
        // A thread, not a task: the pipe is blocking, and the thread ends
        // with the process (end of file).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Prism {
            child,
            lines,
            log: Vec::new(),
            closed: false,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Every line read so far.
    pub fn log(&self) -> &[LogLine] {
        &self.log
    }

    /// The log read so far, as text (for failure messages).
    pub fn log_text(&self) -> String {
        self.log
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether a line read so far is the event `message`.
    pub fn logged(&self, message: &str) -> bool {
        self.log.iter().any(|l| l.is(message))
    }

    /// Reads the log up to its first line that is the event `message`;
    /// panics, with the log, when none comes within `within`.
    pub async fn wait_for(&mut self, message: &str, within: Duration) -> LogLine {
        self.wait_for_line(|l| l.is(message), within)
            .await
            .unwrap_or_else(|log| {
                panic!("prism did not log {message:?} within {within:?}; log:\n{log}")
            })
    }

    /// The first line of the log that satisfies `f`, reading on as needed
    /// for up to `within`; Err(the log) when none came.
    pub async fn wait_for_line(
        &mut self,
        mut f: impl FnMut(&LogLine) -> bool,
        within: Duration,
    ) -> Result<LogLine, String> {
        if let Some(line) = self.log.iter().find(|l| f(l)) {
            return Ok(line.clone());
        }
        let deadline = Instant::now() + within;
        while !self.closed {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(text)) => {
                    let line = LogLine::new(text);
                    self.log.push(line.clone());
                    if f(&line) {
                        return Ok(line);
                    }
                }
                Ok(None) => self.closed = true,
                Err(_) => break,
            }
        }
        Err(self.log_text())
    }

    /// The gRPC address, from the "prism serving" event.
    pub async fn grpc_addr(&mut self) -> SocketAddr {
        self.addr_of("prism serving", "grpc_addr").await
    }

    /// The admin plane's address, from the "admin plane serving" event.
    pub async fn http_addr(&mut self) -> SocketAddr {
        self.addr_of("admin plane serving", "http_addr").await
    }

    async fn addr_of(&mut self, message: &str, field: &str) -> SocketAddr {
        let line = self.wait_for(message, STARTUP).await;
        line.field(field)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {:?}", line.text))
    }

    /// Sends `signal` with `kill`.
    pub fn signal(&self, signal: Signal) {
        let name = match signal {
            Signal::Term => "-TERM",
            Signal::Int => "-INT",
        };
        let ok = Command::new("kill")
            .arg(name)
            .arg(self.id().to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {name} {} failed", self.id());
    }

    /// Whether the process has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_some()
    }

    /// Reads the log to its end and reaps the process; kills it and panics,
    /// with the log, when it does not exit within `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        // Stderr closes when the process exits: wait for that, not a timer.
        let _ = self.wait_for_line(|_| false, within).await;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "prism did not exit within {within:?}; log:\n{}",
                    self.log_text()
                );
            }
            // Closed stderr, not yet reaped: a matter of microseconds.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Prism {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
