//! The `central` sink's dispatcher: the queue of devices with rows waiting, which device goes
//! next (a registration or a batch of its messages), and the bookkeeping that puts a device
//! back in line once its request is done.

use std::sync::Arc;

use tokio::time::Instant;

use super::tasks::{register_task, send_task};
use super::{lock, OutMsg, Shared, St};
use crate::sinks::central::hub;

pub(super) fn enqueue(st: &mut St, m: OutMsg) {
    let id: Arc<str> = match st.devices.get_key_value(m.device.as_str()) {
        Some((k, _)) => k.clone(),
        None => Arc::from(m.device.as_str()),
    };
    let dev = st.devices.entry(id.clone()).or_default();
    dev.q.push_back(m);
    st.pending += 1;
    if !dev.busy && !dev.queued {
        dev.queued = true;
        st.ready.push_back(id);
    }
}

/// Puts a device back in line after a request or registration (or a delay).
pub(super) fn requeue(st: &mut St, id: &Arc<str>) {
    let Some(dev) = st.devices.get_mut(id) else { return };
    dev.busy = false;
    if dev.q.is_empty() || dev.queued {
        return;
    }
    dev.queued = true;
    match dev.not_before {
        Some(t) if t > Instant::now() => {
            st.seq += 1;
            let seq = st.seq;
            st.delayed.insert((t, seq), id.clone());
        }
        _ => st.ready.push_back(id.clone()),
    }
}

enum Action {
    Register(Arc<str>, Option<String>),
    Send(Arc<str>, String, Vec<OutMsg>),
    Idle(Option<Instant>),
}

fn next_action(sh: &Shared, st: &mut St) -> Action {
    if st.fatal.is_some() || st.paused {
        return Action::Idle(None);
    }
    let now = Instant::now();
    while let Some(entry) = st.delayed.first_entry() {
        if entry.key().0 > now {
            break;
        }
        let id = entry.remove();
        st.ready.push_back(id);
    }
    while let Some(id) = st.ready.pop_front() {
        let Some(dev) = st.devices.get_mut(&id) else { continue };
        dev.queued = false;
        if dev.busy || dev.q.is_empty() {
            continue;
        }
        if let Some(t) = dev.not_before.filter(|t| *t > now) {
            // rows arrived for a device that is waiting out a backoff
            dev.queued = true;
            st.seq += 1;
            st.delayed.insert((t, st.seq), id);
            continue;
        }
        if dev.blocked_until.is_some_and(|t| t > now) {
            let n = dev.q.len();
            dev.q.clear();
            st.pending -= n;
            st.dropped += n as u64;
            sh.metrics.errors.inc_by(n as u64);
            if st.dropped <= 10 || st.dropped % 1000 < n as u64 {
                tracing::error!(
                    component = %sh.name,
                    device = %id,
                    rows = n,
                    dropped_total = st.dropped,
                    "rows of a device that IoT Central refuses were dropped (see the error above)"
                );
            }
            continue;
        }
        let model = dev.q.front().and_then(|m| m.model.clone());
        let needs_registration = dev.hub.is_none() || (model.is_some() && dev.model != model);
        if needs_registration {
            dev.busy = true;
            return Action::Register(id, model);
        }
        let max = if dev.max_batch > 0 { dev.max_batch.min(sh.set.batch_size) } else { sh.set.batch_size };
        let mut take = Vec::new();
        let mut bytes = 0usize;
        while let Some(m) = dev.q.front() {
            let size = m.body.len() * 4 / 3 + m.props.iter().map(|(k, v)| k.len() + v.len() + 30).sum::<usize>() + 200;
            if !take.is_empty() && (take.len() >= max || bytes + size > hub::MAX_BATCH_BYTES) {
                break;
            }
            bytes += size;
            take.push(dev.q.pop_front().unwrap());
        }
        dev.busy = true;
        let hub = dev.hub.clone().unwrap_or_default();
        st.in_flight += 1;
        return Action::Send(id, hub, take);
    }
    Action::Idle(st.delayed.first_key_value().map(|(k, _)| k.0))
}

pub(super) async fn dispatcher(sh: Arc<Shared>) {
    loop {
        let Ok(permit) = sh.send_slots.clone().acquire_owned().await else { return };
        let action = next_action(&sh, &mut lock(&sh.st));
        match action {
            Action::Idle(until) => {
                drop(permit);
                match until {
                    Some(t) => {
                        tokio::select! {
                            _ = sh.wake.notified() => {}
                            _ = tokio::time::sleep_until(t) => {}
                        }
                    }
                    None => sh.wake.notified().await,
                }
            }
            Action::Register(id, model) => {
                drop(permit);
                tokio::spawn(register_task(sh.clone(), id, model));
            }
            Action::Send(id, hub, msgs) => {
                sh.msg_pacer.take(msgs.len()).await;
                tokio::spawn(send_task(sh.clone(), id, hub, msgs, permit));
            }
        }
    }
}
