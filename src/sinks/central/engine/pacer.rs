//! Pacing for the `central` sink: messages to `rate_limit` per second (with a second's burst
//! after a pause), registrations evenly to `registrations_per_minute`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Paces events to a rate, allowing a burst of `burst` worth of them after a pause.
pub(super) struct Pacer {
    per_sec: f64,
    burst: Duration,
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    pub(super) fn new(per_sec: f64, burst: Duration) -> Pacer {
        Pacer { per_sec, burst, next: Mutex::new(None) }
    }
    /// Waits until `n` events may go.
    pub(super) async fn take(&self, n: usize) {
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let floor = now.checked_sub(self.burst).unwrap_or(now);
            let at = match *next {
                Some(t) if t > floor => t,
                _ => floor,
            };
            *next = Some(at + Duration::from_secs_f64(n as f64 / self.per_sec));
            at
        };
        tokio::time::sleep_until(start).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pacer_keeps_the_rate() {
        let p = Pacer::new(1000.0, Duration::from_secs(1));
        let t0 = Instant::now();
        for _ in 0..30 {
            p.take(100).await; // 3,000 at 1,000/s: 1 s of burst, then 2 s
        }
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(1800) && took < Duration::from_millis(2600), "{took:?}");
    }

    #[tokio::test]
    async fn without_a_burst_the_pacer_spaces_every_event() {
        // registrations: 10 at 20/s take 0.45 s (the first goes at once), never faster
        let p = Pacer::new(20.0, Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(300)).await; // an idle pause earns nothing
        let t0 = Instant::now();
        for _ in 0..10 {
            p.take(1).await;
        }
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(440) && took < Duration::from_millis(900), "{took:?}");
    }
}
