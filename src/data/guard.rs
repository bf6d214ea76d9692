//! Panics of a decoder, caught at the reader's boundary.
//!
//! The parquet crate panics on some corrupt files (out-of-range lengths and levels) instead
//! of returning an error. [`catch`] turns such a panic into an error message, with the panic
//! hook silenced on this thread meanwhile so that no backtrace reaches the terminal; a panic
//! anywhere else still goes to the hook that was installed before (Rust's, or a fuzzer's).
//! A reader whose call panicked may hold broken state: callers stop using it.
//!
//! Some corrupt files do not panic but stall: the crate's Thrift reader skips a list of
//! billions of booleans one by one, or a page header loops. [`stall_limited`] runs such a
//! call under a watchdog: when it makes no progress for [`stall_limit`] the process reports
//! the file and record on one line and exits 2, as any input error does. Nothing can stop a
//! loop inside the crate from outside, and a thread cannot be killed, so exiting is the
//! bounded way out.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

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

/// Seconds a decoder call may run without returning before the run is ended:
/// `MASKAUDIT_DECODE_STALL_SECS` (for tests), else 30. A healthy file returns a row far
/// sooner, even from a large compressed page.
pub fn stall_limit() -> Duration {
    let secs = std::env::var("MASKAUDIT_DECODE_STALL_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(30.0);
    Duration::from_secs_f64(secs)
}

/// The call being watched: its deadline and the error line to print if it passes.
static WATCHED: Mutex<Option<(Instant, String)>> = Mutex::new(None);
static WATCHDOG: Once = Once::new();

/// Runs `f`; if it has not returned after [`stall_limit`], prints `maskaudit: error:
/// {message}` and exits 2. Not under the fuzzer, which has timeouts of its own.
pub fn stall_limited<T>(message: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if cfg!(fuzzing) {
        return f();
    }
    let limit = stall_limit();
    WATCHDOG.call_once(|| {
        std::thread::spawn(watchdog);
    });
    let line = format!(
        "{} (no progress for {:.0} s)",
        message(),
        limit.as_secs_f64()
    );
    set_watch(Some((Instant::now() + limit, line)));
    let out = f();
    set_watch(None);
    out
}

fn set_watch(value: Option<(Instant, String)>) {
    let mut watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
    *watched = value;
}

#[allow(clippy::print_stderr)]
fn watchdog() {
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((deadline, line)) = watched.as_ref() {
            if Instant::now() > *deadline {
                eprintln!("maskaudit: error: {line}");
                std::process::exit(2);
            }
        }
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
