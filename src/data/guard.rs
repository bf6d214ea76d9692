//! Panics of a decoder, caught at the reader's boundary.
//!
//! The parquet crate panics on some corrupt files (out-of-range lengths and levels) instead
//! of returning an error. [`catch`] turns such a panic into an error message, with the panic
//! hook silenced on this thread meanwhile so that no backtrace reaches the terminal; a panic
//! anywhere else still goes to the hook that was installed before (Rust's, or a fuzzer's).
//! A reader whose call panicked may hold broken state: callers stop using it.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

static QUIET_HOOK: Once = Once::new();

/// Runs `f`; a panic inside it becomes `Err(its message)`, printed nowhere.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    QUIET_HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !CATCHING.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let outer = CATCHING.with(|c| c.replace(true));
    // The state `f` touches is abandoned after a panic, never observed broken.
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    result.map_err(|payload| message(payload.as_ref()))
}

fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
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
    fn a_panic_becomes_its_message() {
        assert_eq!(catch(|| 7), Ok(7));
        assert_eq!(
            catch(|| -> i32 { panic!("bad level {}", 3) }),
            Err("bad level 3".to_string())
        );
        assert_eq!(
            catch(|| -> i32 { std::panic::panic_any(5u8) }),
            Err("a panic without a message".to_string())
        );
        // Nested: the inner catch leaves the outer one silent.
        assert_eq!(
            catch(|| {
                let inner = catch(|| -> i32 { panic!("inner") });
                assert_eq!(inner, Err("inner".to_string()));
                panic!("outer")
            }),
            Err::<(), _>("outer".to_string())
        );
    }
}
