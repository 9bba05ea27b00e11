//! The one retry policy of labsync's background work (the event relay, the
//! asynchronous deletes), and the one loop that runs a pass every so often.
//!
//! # Guarantees
//! - A failure is retried after a capped exponential backoff, less a random
//!   part of up to [`JITTER`] of it, so that many failures at one moment
//!   (a sink that comes back, a CML restart) do not all retry at once.
//! - The wait never exceeds the cap, and is never under `(1 - JITTER)` of
//!   the exponential value.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

/// The share of a backoff that is taken off at random.
pub const JITTER: f64 = 0.2;

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure.
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    /// The wait after `failures` failed attempts before jitter: `base`,
    /// 2 `base`, 4 `base`... capped at `max`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failures.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The wait after `failures` failed attempts, with `draw` (in `[0, 1)`)
    /// choosing how much of [`JITTER`] is taken off.
    pub fn delay_with(&self, failures: u32, draw: f64) -> Duration {
        let ceiling = self.ceiling(failures);
        let draw = if draw.is_nan() {
            0.0
        } else {
            draw.clamp(0.0, 1.0)
        };
        ceiling.mul_f64(1.0 - JITTER * draw)
    }

    /// The wait after `failures` failed attempts, jittered at random.
    pub fn delay(&self, failures: u32) -> Duration {
        self.delay_with(failures, rand::random::<f64>())
    }
}

/// Waits for the next pass of a background loop: `period`, or sooner when
/// `woken` completes. False once `stop` is true: the loop ends.
pub async fn next_pass(
    period: Duration,
    stop: &mut watch::Receiver<bool>,
    woken: impl Future<Output = ()>,
) -> bool {
    tokio::select! {
        () = tokio::time::sleep(period) => true,
        () = woken => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_is_capped_and_jitter_only_shortens_it() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let got: Vec<u128> = (1..=6).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.ceiling(0), b.base);
        assert_eq!(b.ceiling(u32::MAX), b.max);
        assert_eq!(b.delay_with(3, 0.0), Duration::from_millis(400));
        assert_eq!(b.delay_with(3, 1.0), Duration::from_millis(320));
        assert_eq!(b.delay_with(3, 7.0), Duration::from_millis(320), "clamped");
        assert_eq!(b.delay_with(3, f64::NAN), Duration::from_millis(400));
        for n in 1..=10 {
            let d = b.delay(n);
            assert!(
                d <= b.ceiling(n) && d >= b.ceiling(n).mul_f64(1.0 - JITTER),
                "{d:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_pass_comes_after_the_period_or_when_woken_and_none_after_stop() {
        let (tx, mut rx) = watch::channel(false);
        assert!(next_pass(Duration::from_millis(1), &mut rx, std::future::pending()).await);
        assert!(next_pass(Duration::from_secs(3600), &mut rx, async {}).await);
        tx.send(true).unwrap();
        assert!(!next_pass(Duration::from_secs(3600), &mut rx, std::future::pending()).await);
    }
}
