//! One registration or send of the `central` sink, and what its outcome does to the device's
//! state: retries with backoff, registering again, smaller batches, blocked devices, and logs
//! that name each device's trouble once rather than per row.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::dispatch::requeue;
use super::{lock, Dev, OutMsg, Shared};
use crate::sinks::central::dps::{self, RegOutcome};
use crate::sinks::central::hub::{self, SendOutcome};
use crate::sinks::central::{mqtt, Transport};

const BLOCKED_FOR: Duration = Duration::from_secs(600);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Logs a device's trouble: the first time for each device (for the first 50 devices), then
/// every thousandth time in all, so that a thousand failing devices do not flood the log.
/// Holds a device back for `wait` and logs why (as [`device_log`] does, at warning level).
fn defer(sh: &Shared, dev: &mut Dev, total: &mut u64, id: &str, wait: std::time::Duration, msg: &str) {
    dev.not_before = Some(Instant::now() + wait);
    device_log(sh, dev, total, tracing::Level::WARN, id, msg);
}

fn device_log(sh: &Shared, dev: &mut Dev, total: &mut u64, level: tracing::Level, id: &str, msg: &str) {
    dev.logged += 1;
    *total += 1;
    let first = dev.logged == 1 && sh.logged_devices.fetch_add(1, Ordering::Relaxed) < 50;
    if !first && *total % 1000 != 0 {
        return;
    }
    let msg = crate::secret::redact(msg);
    if level == tracing::Level::ERROR {
        tracing::error!(component = %sh.name, device = %id, "{msg}");
    } else {
        tracing::warn!(component = %sh.name, device = %id, "{msg}");
    }
}

/// Stops sending for a device IoT Central refuses: its rows are dropped (and counted in errors)
/// for [`BLOCKED_FOR`], then its registration is tried again.
fn block_device(sh: &Shared, dev: &mut Dev, total: &mut u64, id: &str, why: &str) {
    dev.blocked_until = Some(Instant::now() + BLOCKED_FOR);
    let minutes = BLOCKED_FOR.as_secs() / 60;
    let msg = format!("{why}; its rows are dropped (counted in errors) for the next {minutes} minutes");
    device_log(sh, dev, total, tracing::Level::ERROR, id, &msg);
}

pub(super) async fn register_task(sh: Arc<Shared>, id: Arc<str>, model: Option<String>) {
    let Ok(_slot) = sh.reg_slots.acquire().await else { return };
    // until one registration has worked, one at a time: a wrong key then fails once, clearly
    let gate = if sh.verified.load(Ordering::Relaxed) {
        None
    } else {
        let g = sh.first_registration.lock().await;
        // another registration may have succeeded while this one waited
        (!sh.verified.load(Ordering::Relaxed)).then_some(g)
    };
    let mut outcome;
    let mut tries = 0;
    loop {
        if lock(&sh.st).fatal.is_some() {
            return;
        }
        sh.reg_pacer.take(1).await;
        outcome = dps::register(&sh, &id, model.as_deref()).await;
        tries += 1;
        // one retry of a refusal before calling it a configuration error (clock skew, a race)
        if matches!(outcome, RegOutcome::Unauthorized(_)) && tries == 1 && !sh.verified.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        break;
    }
    let verified = sh.verified.load(Ordering::Relaxed);
    let mut st = lock(&sh.st);
    let st = &mut *st;
    let Some(dev) = st.devices.get_mut(&id) else { return };
    match outcome {
        RegOutcome::Assigned(hub) => {
            sh.verified.store(true, Ordering::Relaxed);
            tracing::debug!(device = %id, hub = %hub, "registered");
            dev.hub = Some(hub);
            dev.model = model;
            dev.backoff = Duration::ZERO;
            dev.not_before = None;
            dev.blocked_until = None;
            st.cache_dirty = true;
        }
        RegOutcome::Unauthorized(detail) if !verified => {
            st.fatal = Some(format!(
                "DPS refused the credentials of device {id:?} in ID scope {:?} ({detail}): the group key is not a key of \
                 this application's SAS-IoT-Devices enrollment group, or the ID scope is wrong (check id_scope and group_key)",
                sh.set.id_scope
            ));
            // reported once, by the runtime, as the reason the pipeline stops
        }
        RegOutcome::Unauthorized(detail) => {
            let why = format!("DPS refused device {id:?} in ID scope {:?} ({detail})", sh.set.id_scope);
            block_device(&sh, dev, &mut st.retries, &id, &why);
        }
        RegOutcome::Blocked(detail) | RegOutcome::DeviceError(detail) => {
            let why = format!("IoT Central does not accept device {id:?}: {detail}");
            block_device(&sh, dev, &mut st.retries, &id, &why);
        }
        RegOutcome::Retry(after, why) => {
            let wait = after.unwrap_or_else(|| next_backoff(&mut dev.backoff));
            defer(
                &sh,
                dev,
                &mut st.retries,
                &id,
                wait,
                &format!("registration of {id:?} will be retried in {wait:?}: {why}"),
            );
        }
    }
    drop(gate);
    requeue(st, &id);
    sh.wake.notify_one();
    sh.progress.notify_one();
}

fn next_backoff(b: &mut Duration) -> Duration {
    *b = if b.is_zero() { Duration::from_millis(200) } else { (*b * 2).min(MAX_BACKOFF) };
    // a little jitter so that devices that failed together do not retry together
    let jitter = rand::random::<f64>() * 0.2 + 0.9;
    b.mul_f64(jitter)
}

pub(super) async fn send_task(
    sh: Arc<Shared>,
    id: Arc<str>,
    hub: String,
    msgs: Vec<OutMsg>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let outcome = match sh.set.transport {
        Transport::Mqtt => mqtt::send(&sh, &hub, &id, &msgs).await,
        Transport::Https => hub::send(&sh, &hub, &id, &msgs, false).await,
        Transport::HttpsBatch => hub::send(&sh, &hub, &id, &msgs, true).await,
    };
    let n = msgs.len();
    let bytes: usize = msgs.iter().map(|m| m.body.len()).sum();
    let mut st = lock(&sh.st);
    let st = &mut *st;
    st.in_flight -= 1;
    let Some(dev) = st.devices.get_mut(&id) else { return };
    let (sent, rest, problem) = match outcome {
        SendOutcome::Sent => (n, Vec::new(), None),
        SendOutcome::Partial(acked, problem) => {
            let mut rest = Vec::new();
            let mut sent = 0;
            for (m, ok) in msgs.into_iter().zip(acked.into_iter().chain(std::iter::repeat(false))) {
                if ok {
                    sent += 1;
                } else {
                    rest.push(m);
                }
            }
            (sent, rest, Some(*problem))
        }
        other => (0, msgs, Some(other)),
    };
    if sent > 0 && !sh.ready.swap(true, Ordering::Relaxed) {
        crate::metrics::set_ready(&sh.name, true, "sending");
    }
    if sent > 0 {
        st.pending -= sent;
        sh.metrics.events_out.inc_by(sent as u64);
        if rest.is_empty() {
            sh.metrics.bytes_out.inc_by(bytes as u64);
        }
        dev.backoff = Duration::ZERO;
        dev.auth_failures = 0;
    }
    match problem {
        None | Some(SendOutcome::Sent) | Some(SendOutcome::Partial(..)) => {}
        Some(SendOutcome::Retry(after, why)) => {
            st.retries += 1;
            if sh.ready.swap(false, Ordering::Relaxed) {
                crate::metrics::set_ready(&sh.name, false, &format!("retrying: {why}"));
            }
            let wait = after.unwrap_or_else(|| next_backoff(&mut dev.backoff));
            dev.not_before = Some(Instant::now() + wait);
            put_back(dev, rest);
            if st.retries <= 10 || st.retries % 1000 == 0 {
                tracing::warn!(component = %sh.name, device = %id, retries = st.retries, "retrying in {wait:?}: {why}");
            }
        }
        Some(SendOutcome::Reauth(why)) | Some(SendOutcome::NotFound(why)) => {
            // the hub does not know this device (any more), or its key: derive it again and register again
            dev.auth_failures += 1;
            dev.hub = None;
            st.cache_dirty = true;
            if dev.auth_failures > 2 {
                let wait = next_backoff(&mut dev.backoff);
                defer(&sh, dev, &mut st.retries, &id, wait, &format!("{why}; registering again in {wait:?}"));
            } else {
                tracing::info!(component = %sh.name, device = %id, "{why}; registering again");
            }
            put_back(dev, rest);
        }
        Some(SendOutcome::TooLarge(why)) if rest.len() > 1 => {
            dev.max_batch = (rest.len() / 2).max(1);
            put_back(dev, rest);
            tracing::info!(component = %sh.name, device = %id, "{why}: smaller batches for this device");
        }
        Some(SendOutcome::TooLarge(why)) | Some(SendOutcome::Bad(why)) => {
            let k = rest.len();
            st.pending -= k;
            st.dropped += k as u64;
            sh.metrics.errors.inc_by(k as u64);
            tracing::error!(component = %sh.name, device = %id, rows = k, "IoT Hub refused messages, which are dropped: {why}");
        }
    }
    requeue(st, &id);
    sh.wake.notify_one();
    sh.progress.notify_one();
}

fn put_back(dev: &mut Dev, rest: Vec<OutMsg>) {
    for m in rest.into_iter().rev() {
        dev.q.push_front(m);
    }
}
