//! Faults a test asks for ahead of time: each is armed for the next N matching requests and
//! taken, first armed first, when a request reaches the point where it applies.

use std::time::Duration;

/// What to do to one request instead of (or after) answering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Answer with this status and `Retry-After`, with no effect on the state.
    Fail { status: u16, retry_after_secs: u64 },
    /// Reset the connection as soon as the head is read.
    Reset,
    /// Hold the connection without answering, then close it; no effect on the state.
    Stall(Duration),
    /// Process the request (store, or complete), then reset instead of answering.
    DropAfterAccepting,
    /// Process the request (store, or complete), then hold the connection without answering
    /// for this long and close it: the client cannot know it took effect.
    HoldAfterAccepting(Duration),
}

/// Where in the exchange a fault is looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Just after the head: resets and stalls.
    Head,
    /// With the whole body read: failures and drops of uploads.
    Body,
}

impl Action {
    fn phase(self) -> Phase {
        match self {
            Action::Reset | Action::Stall(_) => Phase::Head,
            Action::Fail { .. } | Action::DropAfterAccepting | Action::HoldAfterAccepting(_) => Phase::Body,
        }
    }
}

struct Armed {
    action: Action,
    remaining: usize,
    /// Only requests to this path, or any path.
    path: Option<String>,
}

#[derive(Default)]
pub(crate) struct Faults {
    armed: Vec<Armed>,
}

impl Faults {
    pub fn arm(&mut self, action: Action, count: usize, path: Option<&str>) {
        if count > 0 {
            self.armed.push(Armed { action, remaining: count, path: path.map(str::to_owned) });
        }
    }

    /// Takes the first armed fault of this phase that matches the path, if any.
    pub fn take(&mut self, phase: Phase, path: &str) -> Option<Action> {
        let i = self
            .armed
            .iter()
            .position(|a| a.action.phase() == phase && a.path.as_deref().is_none_or(|p| p == path))?;
        let action = self.armed[i].action;
        self.armed[i].remaining -= 1;
        if self.armed[i].remaining == 0 {
            self.armed.remove(i);
        }
        Some(action)
    }

    /// Gives back a fault that was taken but did not apply, so that it applies to the next match.
    pub fn give_back(&mut self, action: Action, path: &str) {
        self.armed.insert(0, Armed { action, remaining: 1, path: Some(path.to_owned()) });
    }

    pub fn clear(&mut self) {
        self.armed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_apply_in_order_to_matching_requests_only() {
        let mut faults = Faults::default();
        faults.arm(Action::Reset, 1, Some("/api/complete"));
        faults.arm(Action::Stall(Duration::from_secs(1)), 2, None);
        faults.arm(Action::DropAfterAccepting, 1, Some("/api/upload"));
        assert_eq!(faults.take(Phase::Body, "/api/complete"), None);
        assert_eq!(faults.take(Phase::Head, "/api/upload"), Some(Action::Stall(Duration::from_secs(1))));
        assert_eq!(faults.take(Phase::Head, "/api/complete"), Some(Action::Reset));
        assert_eq!(faults.take(Phase::Head, "/api/complete"), Some(Action::Stall(Duration::from_secs(1))));
        assert_eq!(faults.take(Phase::Head, "/api/complete"), None);
        assert_eq!(faults.take(Phase::Body, "/api/upload"), Some(Action::DropAfterAccepting));
        faults.give_back(Action::DropAfterAccepting, "/api/upload");
        assert_eq!(faults.take(Phase::Body, "/api/upload"), Some(Action::DropAfterAccepting));
        assert_eq!(faults.take(Phase::Body, "/api/upload"), None);
    }
}
