//! Restart bookkeeping shared by every supervisor in Canopy: the restart intensity window
//! (Erlang's `MaxR` restarts in `MaxT` seconds) and the exponential restart backoff with
//! jitter that resets after a healthy period.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;

/// How many restarts are tolerated in how long before a supervisor gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    /// Restarts allowed within `period`; one more escalates.
    pub max_restarts: u32,
    /// The sliding window.
    pub period: Duration,
}

impl Default for Intensity {
    /// Erlang's default: 1 restart in 5 seconds is too strict for runners that take
    /// time to load, so Canopy uses 3 restarts in 60 seconds.
    fn default() -> Self {
        Self {
            max_restarts: 3,
            period: Duration::from_secs(60),
        }
    }
}

/// A sliding window of recent restarts, checked against an [`Intensity`].
#[derive(Debug, Clone)]
pub struct RestartWindow {
    intensity: Intensity,
    restarts: VecDeque<Instant>,
}

impl RestartWindow {
    /// An empty window for `intensity`.
    pub fn new(intensity: Intensity) -> Self {
        Self {
            intensity,
            restarts: VecDeque::new(),
        }
    }

    /// Records a restart at `now`; returns `false` when this restart exceeds the
    /// intensity (the caller must then escalate instead of restarting).
    pub fn record(&mut self, now: Instant) -> bool {
        while let Some(first) = self.restarts.front() {
            if now.duration_since(*first) > self.intensity.period {
                self.restarts.pop_front();
            } else {
                break;
            }
        }
        self.restarts.push_back(now);
        self.restarts.len() as u32 <= self.intensity.max_restarts
    }

    /// Restarts counted in the current window.
    pub fn recent(&self) -> usize {
        self.restarts.len()
    }
}

/// Exponential restart delay with jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first restart after a healthy period (zero restarts at once).
    pub initial: Duration,
    /// Upper bound of the delay.
    pub max: Duration,
    /// Growth factor per consecutive restart.
    pub factor: f64,
    /// Fraction of the delay that is randomised, in `0.0..=1.0` (0.2 = plus or minus 20 %).
    pub jitter: f64,
    /// A child that stayed up this long counts as healthy: the next delay is `initial` again.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            factor: 2.0,
            jitter: 0.2,
            reset_after: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// A delay that doubles from `initial` up to `max` with no jitter (for schedules other
    /// than child restarts: redialling a peer, placing an instance again). `reset_after` is
    /// the default one's.
    pub fn doubling(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            factor: 2.0,
            jitter: 0.0,
            ..Self::default()
        }
    }

    /// No delay at all: restarts happen immediately (useful in tests).
    pub fn none() -> Self {
        Self {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            factor: 1.0,
            jitter: 0.0,
            reset_after: Duration::from_secs(30),
        }
    }

    /// The delay before restart number `attempt` (0-based count of consecutive restarts).
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.initial.as_secs_f64() * self.factor.powi(attempt.min(64) as i32);
        let base = base.min(self.max.as_secs_f64());
        if base <= 0.0 {
            return Duration::ZERO;
        }
        let jitter = self.jitter.clamp(0.0, 1.0);
        let scale = if jitter > 0.0 {
            rand::rng().random_range((1.0 - jitter)..=(1.0 + jitter))
        } else {
            1.0
        };
        Duration::from_secs_f64((base * scale).min(self.max.as_secs_f64()))
    }
}

/// Tracks consecutive restarts of one child to pick its next [`Backoff`] delay.
#[derive(Debug, Clone)]
pub struct BackoffState {
    backoff: Backoff,
    attempt: u32,
    started_at: Option<Instant>,
}

impl BackoffState {
    /// Fresh state: the next delay is `backoff.initial`.
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            attempt: 0,
            started_at: None,
        }
    }

    /// Notes that the child (re)started at `now`.
    pub fn started(&mut self, now: Instant) {
        self.started_at = Some(now);
    }

    /// Notes that the child died at `now` and returns the delay before restarting it.
    /// A child that had been up for `reset_after` or longer resets the sequence.
    pub fn next_delay(&mut self, now: Instant) -> Duration {
        if let Some(started) = self.started_at.take()
            && now.duration_since(started) >= self.backoff.reset_after
        {
            self.attempt = 0;
        }
        let delay = self.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubling_is_exact_and_capped() {
        let b = Backoff::doubling(Duration::from_millis(250), Duration::from_secs(5));
        let delays: Vec<u128> = (0..8).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn window_allows_max_restarts_then_refuses() {
        let mut w = RestartWindow::new(Intensity {
            max_restarts: 2,
            period: Duration::from_secs(10),
        });
        let t = Instant::now();
        assert!(w.record(t));
        assert!(w.record(t + Duration::from_secs(1)));
        assert!(!w.record(t + Duration::from_secs(2)));
    }

    #[test]
    fn window_forgets_old_restarts() {
        let mut w = RestartWindow::new(Intensity {
            max_restarts: 1,
            period: Duration::from_secs(5),
        });
        let t = Instant::now();
        assert!(w.record(t));
        assert!(w.record(t + Duration::from_secs(6)));
        assert_eq!(w.recent(), 1);
    }

    #[test]
    fn backoff_grows_caps_and_resets() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
            factor: 2.0,
            jitter: 0.0,
            reset_after: Duration::from_secs(5),
        };
        let mut s = BackoffState::new(b);
        let t = Instant::now();
        s.started(t);
        assert_eq!(s.next_delay(t), Duration::from_millis(100));
        s.started(t);
        assert_eq!(s.next_delay(t), Duration::from_millis(200));
        s.started(t);
        assert_eq!(s.next_delay(t), Duration::from_millis(350));
        s.started(t);
        assert_eq!(
            s.next_delay(t + Duration::from_secs(6)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let b = Backoff {
            jitter: 0.5,
            ..Backoff::default()
        };
        for _ in 0..200 {
            let d = b.delay(0);
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(150),
                "{d:?}"
            );
        }
    }
}
