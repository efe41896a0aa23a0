//! systemd `Type=notify` integration: READY/RELOADING/STOPPING and the
//! watchdog. Every call is a no-op when `NOTIFY_SOCKET` is unset.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Listeners are bound and serving.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// A reload has started; call [`ready`] when it is done.
pub fn reloading() {
    // systemd ≥ 253 wants MONOTONIC_USEC with RELOADING=1 for
    // Type=notify-reload; plain Type=notify accepts it as is.
    send(&[NotifyState::Reloading]);
}

/// Draining before exit.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// When `WatchdogSec=` is set, pings at half the interval until the
/// runtime stops. The ping runs on the runtime, so a wedged runtime is
/// exactly what the watchdog catches.
pub fn spawn_watchdog() {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec / 2).max(Duration::from_millis(10));
    tracing::info!(
        period_ms = period.as_millis() as u64,
        "systemd watchdog enabled"
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}
