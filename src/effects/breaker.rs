//! A circuit breaker per upstream: closed → open after `failures` failures within
//! `window_ms` → after `open_ms` one probe is let through (half-open) → its success closes
//! the breaker, its failure opens it again. Time is passed in (ms), so tests drive it.

use shards::manifest::BreakerSpec;
use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: u64 },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
pub struct Breaker {
    spec: BreakerSpec,
    state: State,
    failures: VecDeque<u64>,
}

/// May a call go ahead?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Go,
    /// Open (or a probe is already out): wait this long before asking again.
    Wait {
        ms: u64,
    },
}

impl Breaker {
    pub fn new(spec: BreakerSpec) -> Self {
        Self { spec, state: State::Closed, failures: VecDeque::new() }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// 0 closed, 1 half-open, 2 open (the `/metrics` gauge).
    pub fn gauge(&self) -> f64 {
        match self.state {
            State::Closed => 0.0,
            State::HalfOpen { .. } => 1.0,
            State::Open { .. } => 2.0,
        }
    }

    pub fn permit(&mut self, now: u64) -> Permit {
        match self.state {
            State::Closed => Permit::Go,
            State::Open { until } if now < until => Permit::Wait { ms: until - now },
            State::Open { .. } => {
                self.state = State::HalfOpen { probing: true };
                Permit::Go
            }
            State::HalfOpen { probing: true } => Permit::Wait { ms: self.spec.open_ms.clamp(100, 1_000) },
            State::HalfOpen { probing: false } => {
                self.state = State::HalfOpen { probing: true };
                Permit::Go
            }
        }
    }

    pub fn success(&mut self) {
        self.state = State::Closed;
        self.failures.clear();
    }

    pub fn failure(&mut self, now: u64) {
        match self.state {
            State::HalfOpen { .. } => self.state = State::Open { until: now + self.spec.open_ms },
            State::Open { .. } => {}
            State::Closed => {
                self.failures.push_back(now);
                while self.failures.front().is_some_and(|&t| t + self.spec.window_ms < now) {
                    self.failures.pop_front();
                }
                if self.failures.len() as u32 >= self.spec.failures {
                    self.failures.clear();
                    self.state = State::Open { until: now + self.spec.open_ms };
                }
            }
        }
    }

    /// A permit that was granted but not used (e.g. the gate said "already done").
    pub fn cancel(&mut self) {
        if self.state == (State::HalfOpen { probing: true }) {
            self.state = State::HalfOpen { probing: false };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Breaker {
        Breaker::new(BreakerSpec { failures: 3, window_ms: 1_000, open_ms: 5_000 })
    }

    #[test]
    fn opens_after_failures_within_the_window_only() {
        let mut br = b();
        br.failure(0);
        br.failure(100);
        br.failure(1_200); // the first fell out of the window
        assert_eq!(br.state(), State::Closed);
        br.failure(1_250); // and now the second
        assert_eq!(br.state(), State::Closed);
        br.failure(1_300);
        assert_eq!(br.state(), State::Open { until: 6_300 });
        assert_eq!(br.permit(2_000), Permit::Wait { ms: 4_300 });
    }

    #[test]
    fn half_opens_with_one_probe_then_closes_or_reopens() {
        let mut br = b();
        for t in 0..3 {
            br.failure(t);
        }
        assert_eq!(br.permit(5_002), Permit::Go); // the probe
        assert_eq!(br.state(), State::HalfOpen { probing: true });
        assert!(matches!(br.permit(5_003), Permit::Wait { .. }), "a second probe went out");
        br.failure(5_010);
        assert_eq!(br.state(), State::Open { until: 10_010 });
        assert_eq!(br.permit(10_010), Permit::Go);
        br.success();
        assert_eq!(br.state(), State::Closed);
        assert_eq!(br.permit(10_011), Permit::Go);
    }
}
