//! The tarpit: when one VM refuses more requests in a second than a busy node's kubelets
//! would cause, further refusals of callers it cannot hold to account are answered after a
//! delay instead of at once.
//!
//! Why: a refusal the filter answers itself is cheap, but a flood of them (garbage tokens, no
//! credential at all, junk paths) still costs the Envoy worker a request's parsing, routing and
//! answer each, on the same thread as the good clients. Answered at once, a flooding client on a
//! few kept-alive connections sends thousands a second. Held for [`HOLD_MS`], the same
//! connections send a handful, and the worker serves the good clients.
//!
//! What is held: refusals decided before or at the token check (401, 429, and the 404/405 of a
//! path or method refused before it). Never held: requests the filter forwards, and refusals of a
//! caller whose token was verified (a ServiceAccount refused a connector is accountable, and a
//! client retrying a connector that was just deleted must not stall). Below the threshold
//! nothing is held (a client's first, credential-less request, which registries answer with a
//! challenge, is answered at once).
//!
//! A held request costs its stream's memory until it is answered; at most [`MAX_HELD`] are held
//! per VM, past that a refusal is answered at once (Envoy's connection limit bounds the rest).
//! The shim holds by pausing the request and answers from the root context's tick; the decision
//! of what may be held is the engine's (`Decision::Respond::authenticated`).

use crate::respond::LocalResponse;

/// Refusals answered at once per VM per second; past it, refusals wait [`HOLD_MS`].
pub const QUICK_REFUSALS_PER_SECOND: u32 = 64;
/// How long a held refusal waits.
pub const HOLD_MS: u64 = 1_000;
/// How many refusals one VM holds at most.
pub const MAX_HELD: usize = 1_024;
/// How often the root context looks for held refusals that are due, while any are held.
pub const TICK_MS: u32 = 100;

/// A refusal waiting for its time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The request's context id.
    pub context: u32,
    pub due_ms: u64,
    pub response: LocalResponse,
}

/// Refusals counted per second, and those held (in the order they are due: every hold is
/// `HOLD_MS`, so arrival order is due order).
#[derive(Debug, Default)]
pub struct Tarpit {
    /// (second, refusals answered or held in it)
    window: (u64, u32),
    held: Vec<Held>,
}

impl Tarpit {
    /// One more refusal of the request `context` at `now_ms`. `Some(response)`: answer it now;
    /// `None`: it is held and [`Tarpit::due`] hands it back when its time comes.
    pub fn refuse(&mut self, context: u32, response: LocalResponse, now_ms: u64) -> Option<LocalResponse> {
        let second = now_ms / 1_000;
        if self.window.0 == second {
            self.window.1 = self.window.1.saturating_add(1);
        } else {
            self.window = (second, 1);
        }
        if self.window.1 <= QUICK_REFUSALS_PER_SECOND || self.held.len() >= MAX_HELD {
            return Some(response);
        }
        self.held.push(Held {
            context,
            due_ms: now_ms.saturating_add(HOLD_MS),
            response,
        });
        None
    }

    /// The held refusals due at `now_ms`, in the order they were held.
    pub fn due(&mut self, now_ms: u64) -> Vec<Held> {
        let ready = self.held.iter().take_while(|h| h.due_ms <= now_ms).count();
        self.held.drain(..ready).collect()
    }

    /// Forgets a held request that went away (its client disconnected): it has no one to
    /// answer, and must not keep its place in [`MAX_HELD`].
    pub fn forget(&mut self, context: u32) {
        self.held.retain(|h| h.context != context);
    }

    pub fn holding(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u32) -> LocalResponse {
        LocalResponse {
            status,
            headers: vec![],
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn below_the_threshold_every_refusal_is_answered_at_once() {
        let mut t = Tarpit::default();
        // Spread over seconds: the count is per second.
        for i in 0..(QUICK_REFUSALS_PER_SECOND * 3) {
            let now = u64::from(i / QUICK_REFUSALS_PER_SECOND) * 1_000 + 5;
            assert_eq!(t.refuse(i, answer(401), now), Some(answer(401)), "refusal {i}");
        }
        assert_eq!(t.holding(), 0);
    }

    #[test]
    fn past_the_threshold_refusals_wait_and_come_back_in_order_when_due() {
        let mut t = Tarpit::default();
        for i in 0..QUICK_REFUSALS_PER_SECOND {
            assert!(t.refuse(i, answer(401), 10_000).is_some());
        }
        assert_eq!(t.refuse(100, answer(401), 10_100), None);
        assert_eq!(t.refuse(101, answer(429), 10_200), None);
        assert_eq!(t.holding(), 2);
        assert!(t.due(11_099).is_empty(), "nothing is due before its hold is over");
        let first = t.due(11_100);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].context, first[0].response.status), (100, 401));
        let second = t.due(20_000);
        assert_eq!((second[0].context, second[0].response.status), (101, 429));
        assert_eq!(t.holding(), 0);
        // A new second starts with its quick budget again.
        assert!(t.refuse(102, answer(401), 11_000).is_some());
    }

    #[test]
    fn a_full_tarpit_answers_at_once_and_a_request_that_went_away_frees_its_place() {
        let mut t = Tarpit::default();
        let now = 50_000;
        for i in 0..QUICK_REFUSALS_PER_SECOND {
            assert!(t.refuse(i, answer(401), now).is_some());
        }
        let first_held = QUICK_REFUSALS_PER_SECOND;
        for i in 0..MAX_HELD as u32 {
            assert!(t.refuse(first_held + i, answer(401), now).is_none());
        }
        assert!(
            t.refuse(9_999_999, answer(401), now).is_some(),
            "past MAX_HELD: answered at once"
        );
        t.forget(first_held);
        assert_eq!(t.holding(), MAX_HELD - 1);
        assert!(
            t.refuse(9_999_998, answer(401), now).is_none(),
            "the freed place is used"
        );
        assert!(t.due(now + HOLD_MS).iter().all(|h| h.context != first_held));
    }
}
