//! What a caught panic said. The control plane catches panics at its task boundaries (a service's
//! actor, a lane's job, a health check loop, a webhook delivery) and reports them as errors; this
//! reads the message out of the payload for those reports.

use std::any::Any;

/// The text of a panic's payload (what `panic!` was given), or a placeholder for other payloads.
pub(crate) fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_read_from_str_and_string_payloads() {
        let caught = |f: fn()| std::panic::catch_unwind(f).unwrap_err();
        assert_eq!(message(caught(|| panic!("plain")).as_ref()), "plain");
        assert_eq!(message(caught(|| panic!("formatted {}", 7)).as_ref()), "formatted 7");
        let other = caught(|| std::panic::panic_any(7u8));
        assert_eq!(message(other.as_ref()), "a panic without a message");
    }
}
