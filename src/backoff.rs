//! Jittered exponential backoff for waiting out an outage (the database prober, the
//! RabbitMQ reconnection): `initial`, doubling up to `max`, each wait drawn in the
//! upper half of its step so that replicas do not retry in step.

use std::time::Duration;

use rand::Rng as _;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(10) }
    }
}

impl Backoff {
    /// The waits between tries, endless: each step doubles up to `max`, jittered.
    pub fn waits(self) -> impl Iterator<Item = Duration> {
        let mut step = self.initial;
        std::iter::from_fn(move || {
            let wait = step.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
            step = (step * 2).min(self.max);
            Some(wait)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_max_within_the_jitter() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_millis(400) };
        let waits: Vec<Duration> = b.waits().take(5).collect();
        let steps = [100, 200, 400, 400, 400];
        for (wait, step) in waits.iter().zip(steps) {
            let step = Duration::from_millis(step);
            assert!(*wait >= step / 2 && *wait <= step, "{wait:?} outside the jitter of {step:?}");
        }
    }
}
