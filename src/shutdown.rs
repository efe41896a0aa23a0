//! Process signals: SIGTERM / SIGINT stop (with drain).

/// Waits for SIGTERM or SIGINT and says which.
///
/// # Errors
/// When the signal handlers cannot be installed.
pub async fn stop_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
