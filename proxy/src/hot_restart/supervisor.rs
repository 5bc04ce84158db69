//! Starting the successor (`SIGHUP`, `POST /hot_restart`) and supervising the generations.
//!
//! The process the user started (the root) serves as the first generation. On a restart it
//! starts the successor from the binary now at its argv\[0\] path, with the same arguments
//! and the next `--restart-epoch`, as its own child. Once it handed over and drained it does
//! not exit: it drops everything it served with and stays as a small supervisor that starts
//! every later generation, reaps processes, forwards `SIGTERM`/`SIGINT` to the generations
//! and exits with the last one's status. So when the root is PID 1 of a container, the
//! container keeps its process across any number of restarts.
//!
//! A generation the supervisor started forwards its `SIGHUP` (or `POST /hot_restart`) to
//! the supervisor, which starts the next one.

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{getpid, getppid, kill_process, waitpid, Pid, Signal, WaitOptions};

use super::Options;
use crate::server::Runtime;

/// Set in a generation's environment to the supervisor's process id.
pub const SUPERVISOR_ENV: &str = "LEGATE_HOT_RESTART_SUPERVISOR";

/// The arguments of the generation of `epoch`: the same, with `--restart-epoch` replaced.
pub fn successor_args(args: &[OsString], epoch: u32) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        if a == "--restart-epoch" {
            skip_next = true;
            continue;
        }
        if a.to_str()
            .is_some_and(|s| s.starts_with("--restart-epoch="))
        {
            continue;
        }
        out.push(a.clone());
    }
    out.push("--restart-epoch".into());
    out.push(epoch.to_string().into());
    out
}

/// Starts the generation of `epoch` as a child of this process.
fn spawn(options: &Options, epoch: u32) -> std::io::Result<Pid> {
    let child = std::process::Command::new(&options.exe)
        .args(successor_args(&options.args, epoch))
        .env(SUPERVISOR_ENV, getpid().as_raw_pid().to_string())
        .spawn()?;
    // Reaped with waitpid below, not through the handle.
    let pid = Pid::from_child(&child);
    drop(child);
    tracing::info!(epoch, pid = pid.as_raw_pid(), exe = %options.exe.display(), "started the next generation");
    Ok(pid)
}

/// The supervisor of this process, when one started it.
fn supervisor() -> Option<Pid> {
    let expected: i32 = std::env::var(SUPERVISOR_ENV).ok()?.parse().ok()?;
    getppid().filter(|p| p.as_raw_pid() == expected)
}

/// In a generation the supervisor started: asks the kernel for `SIGTERM` should the
/// supervisor die, so no generation outlives it unsupervised.
pub fn follow_supervisor() {
    if supervisor().is_some() {
        if let Err(e) = rustix::process::set_parent_process_death_signal(Some(Signal::TERM)) {
            tracing::warn!("cannot follow the supervisor: {e}");
        }
    }
}

fn check(runtime: &Runtime) -> Result<(), String> {
    let state = &runtime.hot_restart;
    if !state.options.enabled {
        return Err("hot restart is disabled (--disable-hot-restart)".into());
    }
    if !state.is_available() {
        return Err(format!(
            "hot restart is unavailable: another process holds {}",
            state.options.socket_name(state.options.epoch)
        ));
    }
    if state.is_handed_over() {
        return Err("this process already handed over".into());
    }
    if let Some(pid) = state.successor() {
        return Err(format!("a restart is in progress (pid {pid})"));
    }
    Ok(())
}

/// `POST /hot_restart`: the same as `SIGHUP`. The signal goes to this process (or its
/// supervisor), so the successor is always started from the main thread: a child's
/// parent-death signal follows the thread that started it.
pub fn trigger(runtime: &Runtime) -> Result<String, String> {
    check(runtime)?;
    let target = supervisor().unwrap_or_else(getpid);
    kill_process(target, Signal::HUP).map_err(|e| format!("cannot signal {target:?}: {e}"))?;
    Ok(format!(
        "hot restart requested: epoch {} starts",
        runtime.hot_restart.options.epoch.saturating_add(1)
    ))
}

/// `SIGHUP`: starts a hot restart of this process. Returns what happened, for the log.
pub fn request_restart(runtime: &Arc<Runtime>) -> Result<String, String> {
    check(runtime)?;
    let state = &runtime.hot_restart;
    let options = &state.options;
    if let Some(sup) = supervisor() {
        kill_process(sup, Signal::HUP).map_err(|e| format!("cannot signal the supervisor: {e}"))?;
        return Ok(format!(
            "asked the supervisor (pid {}) to start epoch {}",
            sup.as_raw_pid(),
            options.epoch.saturating_add(1)
        ));
    }
    let mut successor = state
        .successor
        .lock()
        .map_err(|_| "hot restart state poisoned".to_string())?;
    if let Some(pid) = *successor {
        return Err(format!("a restart is in progress (pid {pid})"));
    }
    let epoch = options.epoch.saturating_add(1);
    let pid = spawn(options, epoch)
        .map_err(|e| format!("cannot start the successor {}: {e}", options.exe.display()))?;
    *successor = Some(pid.as_raw_pid() as u32);
    drop(successor);
    // A successor that fails to start exits; this process keeps serving and may try again.
    let runtime = runtime.clone();
    tokio::spawn(async move {
        let mut handed_over = runtime.hot_restart.handed_over_signal();
        loop {
            if *handed_over.borrow() {
                return;
            }
            match waitpid(Some(pid), WaitOptions::NOHANG) {
                Ok(Some((_, status))) => {
                    tracing::error!(
                        "hot restart: the successor exited ({}) before taking over; still serving",
                        describe(status)
                    );
                    if let Ok(mut s) = runtime.hot_restart.successor.lock() {
                        *s = None;
                    }
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("hot restart: waiting for the successor: {e}");
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = handed_over.changed() => {}
            }
        }
    });
    Ok(format!("started epoch {epoch} (pid {})", pid.as_raw_pid()))
}

/// Forwards `SIGTERM` (or `SIGINT` when `interrupt`) to the successor this process started,
/// while it drains before becoming its supervisor.
pub fn forward(runtime: &Runtime, interrupt: bool) {
    let Some(pid) = runtime
        .hot_restart
        .successor()
        .and_then(|p| i32::try_from(p).ok())
        .and_then(Pid::from_raw)
    else {
        return;
    };
    let sig = if interrupt { Signal::INT } else { Signal::TERM };
    if let Err(e) = kill_process(pid, sig) {
        tracing::warn!("cannot forward {sig:?} to the successor: {e}");
    }
}

fn describe(status: rustix::process::WaitStatus) -> String {
    match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (_, Some(sig)) => format!("signal {sig}"),
        _ => "unknown status".into(),
    }
}

fn exit_code(status: rustix::process::WaitStatus) -> ExitCode {
    match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (_, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
        _ => ExitCode::FAILURE,
    }
}

/// One generation the supervisor started.
#[derive(Debug, Clone, Copy)]
struct Generation {
    pid: Pid,
    epoch: u32,
}

/// Runs the supervisor until the serving generation exits; returns its exit code.
/// `current` is the generation that took over from this process.
pub fn supervise(options: Options, current: u32, epoch: u32) -> ExitCode {
    let Some(pid) = i32::try_from(current).ok().and_then(Pid::from_raw) else {
        return ExitCode::FAILURE;
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("supervisor: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(supervise_loop(options, Generation { pid, epoch }))
}

async fn supervise_loop(options: Options, mut current: Generation) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut hup), Ok(mut term), Ok(mut int), Ok(mut chld)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::child()),
    ) else {
        tracing::error!("supervisor: cannot handle signals");
        return ExitCode::FAILURE;
    };
    tracing::info!(
        pid = current.pid.as_raw_pid(),
        epoch = current.epoch,
        "supervising the serving generation"
    );
    // The generation that is taking over while `current` drains.
    let mut next: Option<Generation> = None;
    loop {
        // Reap everything that exited: our generations and, as PID 1, any orphan.
        loop {
            match waitpid(None, WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    if pid == current.pid {
                        match next.take() {
                            Some(n) => {
                                tracing::info!(
                                    epoch = current.epoch,
                                    "the previous generation exited"
                                );
                                current = n;
                            }
                            None => {
                                tracing::info!(
                                    "the serving generation exited ({}); exiting",
                                    describe(status)
                                );
                                return exit_code(status);
                            }
                        }
                    } else if next.is_some_and(|n| n.pid == pid) {
                        tracing::error!(
                            "hot restart: the next generation exited ({}) before the previous one; the previous one serves",
                            describe(status)
                        );
                        next = None;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // No children left at all.
                    tracing::error!("supervisor: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let forward = tokio::select! {
            _ = hup.recv() => None,
            _ = term.recv() => Some(Signal::TERM),
            _ = int.recv() => Some(Signal::INT),
            _ = chld.recv() => continue,
            // SIGCHLD can coalesce; look again now and then.
            _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
        };
        match forward {
            Some(sig) => {
                for g in std::iter::once(current).chain(next) {
                    let _ = kill_process(g.pid, sig);
                }
            }
            None if next.is_some() => {
                tracing::warn!("hot restart: a restart is in progress; SIGHUP ignored");
            }
            None => {
                let epoch = current.epoch.saturating_add(1);
                match spawn(&options, epoch) {
                    Ok(pid) => next = Some(Generation { pid, epoch }),
                    Err(e) => {
                        tracing::error!("hot restart: cannot start {}: {e}", options.exe.display())
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_successor_gets_the_same_arguments_and_the_next_epoch() {
        let args: Vec<OsString> = ["-c", "b.yaml", "--restart-epoch", "3", "--base-id", "7"]
            .iter()
            .map(OsString::from)
            .collect();
        let got = successor_args(&args, 4);
        let want: Vec<OsString> = ["-c", "b.yaml", "--base-id", "7", "--restart-epoch", "4"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(got, want);
        let got = successor_args(&[OsString::from("--restart-epoch=0")], 1);
        assert_eq!(
            got,
            vec![OsString::from("--restart-epoch"), OsString::from("1")]
        );
    }
}
