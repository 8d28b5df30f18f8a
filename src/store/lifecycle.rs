//! The inspection state machine as a table: which state may follow which, and what a
//! transition needs (an image to upload, a reason to give up). Pure: no SQL, no clock.

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

/// The reason an inspection found `capturing` at open is cancelled with.
pub(crate) fn interrupted_reason(images: u64) -> String {
    let kept = if images == 1 { "1 image kept".to_owned() } else { format!("{images} images kept") };
    format!("capture interrupted: the kiosk stopped before this inspection finished; {kept}")
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
        assert_eq!(
            interrupted_reason(1),
            "capture interrupted: the kiosk stopped before this inspection finished; 1 image kept"
        );
        assert!(interrupted_reason(0).ends_with("; 0 images kept"));
        assert!(interrupted_reason(7).ends_with("; 7 images kept"));
    }
}
