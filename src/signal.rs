//! Shutdown on signals: the first SIGTERM, SIGINT or SIGQUIT starts a
//! graceful drain, a second one exits at once. SIGHUP reloads what can be
//! reloaded (the TLS certificates) and is otherwise logged and ignored;
//! SIGUSR1 is logged and ignored: their default action would end the
//! process silently, and a stray signal from a terminal or a supervisor
//! must not drop the requests in flight.

use std::future::Future;

use tracing::{info, warn};

/// What SIGHUP runs.
pub type Reload = Box<dyn Fn() + Send + Sync>;

/// The exit code after a second signal: 128 + SIGINT, what a shell reports
/// for a process killed by Ctrl-C.
pub const FORCED_EXIT_CODE: i32 = 130;

/// A future that resolves on the first SIGTERM, SIGINT (Ctrl-C) or SIGQUIT, to be
/// passed as the shutdown future of [`crate::run`]. After it has resolved, a
/// second signal logs and exits the process with code 130 without waiting
/// for the drain.
///
/// The handlers are installed when this function is called, not when the
/// future is first polled, so a signal that arrives in between is not lost
/// (and does not kill the process with the default action). Must be called
/// inside a tokio runtime.
///
/// `reload` runs on every SIGHUP; `None` means there is nothing to reload.
pub fn shutdown_signal(
    reload: Option<Reload>,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut signals = Signals::install(reload)?;
    Ok(async move {
        let first = signals.recv().await;
        info!(
            signal = first,
            "shutdown requested; draining (send the signal again to exit at once)"
        );
        // Once a handler is installed the default action (termination) no
        // longer happens, so a stuck drain could only be ended with SIGKILL;
        // keep listening so an operator's second Ctrl-C still works.
        tokio::spawn(async move {
            let second = signals.recv().await;
            warn!(
                signal = second,
                exit_code = FORCED_EXIT_CODE,
                "second signal; exiting without finishing the drain"
            );
            std::process::exit(FORCED_EXIT_CODE);
        });
    })
}

#[cfg(unix)]
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    user1: tokio::signal::unix::Signal,
    reload: Option<Reload>,
}

#[cfg(unix)]
impl Signals {
    fn install(reload: Option<Reload>) -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            // SIGQUIT's default is a core dump; an operator sending it
            // wants the process gone, so it stops like SIGTERM does.
            quit: signal(SignalKind::quit())?,
            hangup: signal(SignalKind::hangup())?,
            user1: signal(SignalKind::user_defined1())?,
            reload,
        })
    }

    /// The name of the next signal that stops the process; SIGHUP and
    /// SIGUSR1 are logged on the way and otherwise ignored.
    async fn recv(&mut self) -> &'static str {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => return "SIGTERM",
                _ = self.interrupt.recv() => return "SIGINT",
                _ = self.quit.recv() => return "SIGQUIT",
                _ = self.hangup.recv() => match &self.reload {
                    Some(reload) => {
                        info!(signal = "SIGHUP", "reload requested");
                        reload();
                    }
                    None => info!(signal = "SIGHUP", "reload requested; nothing to reload"),
                },
                _ = self.user1.recv() => {
                    info!(signal = "SIGUSR1", "signal ignored");
                }
            }
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install(_reload: Option<Reload>) -> std::io::Result<Self> {
        Ok(Signals)
    }

    async fn recv(&mut self) -> &'static str {
        // An error here means no handler could be installed: never resolve
        // rather than shut down for no reason.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        "ctrl-c"
    }
}
