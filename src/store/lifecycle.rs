//! The inspection state machine as a table: which state may follow which, what a transition
//! needs (an image to upload, a reason to give up), and how each state is left. Pure: no SQL,
//! no clock.

use super::InspectionState::{self, Cancelled, Captured, Capturing, Completed, Failed, Uploading};

/// Every legal transition: the states that may follow each state. Anything else is refused.
pub(crate) const TRANSITIONS: [(InspectionState, &[InspectionState]); 6] = [
    (Capturing, &[Captured, Failed, Cancelled]),
    (Captured, &[Uploading, Failed, Cancelled]),
    (Uploading, &[Completed, Captured, Failed]),
    (Completed, &[]),
    (Failed, &[Captured]),
    (Cancelled, &[Captured]),
];

/// The states that may follow `from`.
pub(crate) fn successors(from: InspectionState) -> &'static [InspectionState] {
    TRANSITIONS.iter().find(|(state, _)| *state == from).map_or(&[], |(_, next)| next)
}

/// Whether an inspection in `from` holding `images` images may move to `to` with `reason`;
/// `Err` says why not, in words for the error message.
pub(crate) fn check_transition(
    from: InspectionState,
    to: InspectionState,
    images: u64,
    reason: Option<&str>,
) -> Result<(), String> {
    let next = successors(from);
    if !next.contains(&to) {
        return Err(if next.is_empty() {
            format!("{from} is final")
        } else {
            format!("only {} may follow {from}", join_states(next))
        });
    }
    if to == Captured && images == 0 {
        return Err("it holds no image, so there is nothing to upload".to_owned());
    }
    if matches!(to, Failed | Cancelled) && reason.is_none_or(|r| r.trim().is_empty()) {
        return Err(format!("moving to {to} needs a reason"));
    }
    Ok(())
}

/// The reason a capture with no image fails with, listing why each angle failed.
pub(crate) fn no_image_reason(failures: &[(String, String)]) -> String {
    if failures.is_empty() {
        return "no angle was captured".to_owned();
    }
    let each: Vec<String> = failures.iter().map(|(angle, why)| format!("{angle}: {why}")).collect();
    format!("no angle was captured ({})", each.join("; "))
}

/// Why an angle of an inspection found `capturing` at open (a kill or a power cut
/// mid-capture) was neither stored nor failed.
pub const INTERRUPTED_REASON: &str = "the kiosk stopped during capture";

/// How an inspection leaves a state: by itself (upload, retention, the next open), or only
/// by an operator's decision. The store module doc has the same table in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The kiosk moves it on without anyone acting; says how.
    Automatic(&'static str),
    /// Only an operator moves it on (the `retry` command); says why it waits for one.
    Operator(&'static str),
}

/// The way out of `state` for an inspection that holds images or not.
pub(crate) fn exit(state: InspectionState, holds_images: bool) -> Exit {
    match (state, holds_images) {
        (Capturing, _) => Exit::Automatic(
            "the capture ends, or the owner's next open closes it: captured with what it holds, failed when it holds nothing",
        ),
        (Captured, _) => Exit::Automatic("the uploader takes it"),
        (Uploading, _) => Exit::Automatic("the cloud's answer completes it, fails it, or puts it back in the queue"),
        (Completed, _) => Exit::Automatic(
            "pruned completed_retention after completion, or earlier, oldest first, when the buffer needs the space",
        ),
        (Failed | Cancelled, false) => {
            Exit::Automatic("pruned completed_retention after its last change: it holds nothing to deliver")
        }
        (Failed, true) => Exit::Operator("the cloud refused it for good or it was given up: an operator's retry queues it again"),
        (Cancelled, true) => Exit::Operator("an operator cancelled it: an operator's retry queues it again"),
    }
}

fn join_states(states: &[InspectionState]) -> String {
    let names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
    match names.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        from: InspectionState,
        to: InspectionState,
        images: u64,
        reason: Option<&str>,
        expected: Result<(), &str>,
    ) {
        let got = check_transition(from, to, images, reason);
        match expected {
            Ok(()) => assert_eq!(got, Ok(()), "{from} -> {to} with {images} image(s), reason {reason:?}"),
            Err(part) => {
                let why = got.expect_err(&format!("{from} -> {to} must be refused"));
                assert!(why.contains(part), "{from} -> {to}: {why:?} should say {part:?}");
            }
        }
    }

    #[test]
    fn the_transition_table_allows_exactly_the_documented_moves() {
        let legal = [
            (Capturing, Captured),
            (Capturing, Failed),
            (Capturing, Cancelled),
            (Captured, Uploading),
            (Captured, Failed),
            (Captured, Cancelled),
            (Uploading, Completed),
            (Uploading, Captured),
            (Uploading, Failed),
            (Failed, Captured),
            (Cancelled, Captured),
        ];
        for from in InspectionState::ALL {
            for to in InspectionState::ALL {
                let allowed = check_transition(from, to, 1, Some("why")).is_ok();
                assert_eq!(allowed, legal.contains(&(from, to)), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn transitions_say_why_they_are_refused() {
        check(Completed, Captured, 3, None, Err("completed is final"));
        check(Captured, Completed, 3, None, Err("only uploading, failed or cancelled may follow captured"));
        check(Failed, Uploading, 3, None, Err("only captured may follow failed"));
        check(Capturing, Captured, 0, None, Err("no image"));
        check(Failed, Captured, 0, None, Err("no image"));
        check(Captured, Failed, 2, None, Err("needs a reason"));
        check(Captured, Cancelled, 2, Some("  "), Err("needs a reason"));
        check(Capturing, Failed, 0, Some("camera gone"), Ok(()));
        check(Uploading, Captured, 2, None, Ok(()));
        check(Cancelled, Captured, 1, None, Ok(()));
    }

    #[test]
    fn reasons_read_as_sentences() {
        assert_eq!(no_image_reason(&[]), "no angle was captured");
        let failures =
            [("Front".to_owned(), "camera gone".to_owned()), ("Rear".to_owned(), "bad frame".to_owned())];
        assert_eq!(no_image_reason(&failures), "no angle was captured (Front: camera gone; Rear: bad frame)");
        let interrupted = [("Rear".to_owned(), INTERRUPTED_REASON.to_owned())];
        assert_eq!(
            no_image_reason(&interrupted),
            "no angle was captured (Rear: the kiosk stopped during capture)"
        );
    }

    #[test]
    fn only_failed_or_cancelled_evidence_waits_for_an_operator() {
        for state in InspectionState::ALL {
            for images in [false, true] {
                let operator = matches!(exit(state, images), Exit::Operator(_));
                assert_eq!(
                    operator,
                    images && matches!(state, Failed | Cancelled),
                    "{state} holding images: {images}"
                );
                if operator {
                    // The operator's way out is a legal move.
                    assert!(check_transition(state, Captured, 1, None).is_ok(), "{state}");
                }
            }
        }
    }
}
