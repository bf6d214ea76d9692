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
//! call under a watchdog: when it makes no progress for [`stall_limit`], the run is over.
//! Nothing can stop a loop inside the crate from outside, and a thread cannot be killed, so
//! the watchdog does not touch the stuck thread: it records the stall, and the thread that
//! waits for the stuck one ([`off_thread`], [`recv_watched`]) returns it as an error, which
//! ends the run through the normal path (one line, exit 2, staged outputs removed). The
//! process then exits with the stuck thread still spinning in the decoder, which holds no
//! libtorch state. Decoding therefore never runs on the main thread.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, Once};
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

/// Seconds a decoder call may run without returning before the run is ended: 30 unless
/// [`set_stall_limit`] said otherwise (the binary's settings: `MASKAUDIT_DECODE_STALL_SECS`, for
/// tests). A healthy file returns a row far sooner, even from a large compressed page.
pub fn stall_limit() -> Duration {
    let ms = STALL_LIMIT_MS.load(Ordering::Relaxed);
    if ms == 0 {
        DEFAULT_STALL_LIMIT
    } else {
        Duration::from_millis(ms)
    }
}

/// [`stall_limit`] for the rest of the process.
pub fn set_stall_limit(limit: Duration) {
    let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
    STALL_LIMIT_MS.store(ms, Ordering::Relaxed);
}

const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(30);
/// In milliseconds; 0: not set.
static STALL_LIMIT_MS: AtomicU64 = AtomicU64::new(0);

/// The call being watched: its deadline and the error line if it passes.
static WATCHED: Mutex<Option<(Instant, String)>> = Mutex::new(None);
/// The error line of a call that stalled: the run is over.
static STALLED: Mutex<Option<String>> = Mutex::new(None);
static WATCHDOG: Once = Once::new();

/// How often a waiting thread looks for a stall, and the watchdog for a passed deadline.
const POLL: Duration = Duration::from_millis(100);

/// Runs `f`; if it has not returned after [`stall_limit`], [`stalled`] says so from then on
/// (and `f` never returns). Not under the fuzzer, which has timeouts of its own.
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

/// The error line of a decoder call that stalled, once one has.
pub fn stalled() -> Option<String> {
    STALLED.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn watchdog() {
    loop {
        std::thread::sleep(POLL);
        let watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((deadline, line)) = watched.as_ref() {
            if Instant::now() > *deadline {
                *STALLED.lock().unwrap_or_else(|e| e.into_inner()) = Some(line.clone());
                return;
            }
        }
    }
}

/// Runs `f` on a thread of its own and waits for it: its result, or the stall line if a
/// decoder call stalls meanwhile (the thread is then left behind). A panic in `f` goes on
/// in the caller.
pub fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    let (tx, rx) = mpsc::sync_channel(1);
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match recv_watched(&rx)? {
        Some(value) => Ok(value),
        // The sender went without sending: `f` panicked.
        None => match handle.join() {
            Err(payload) => panic::resume_unwind(payload),
            Ok(()) => unreachable!("the thread sends before it ends"),
        },
    }
}

/// The next value from `rx` (`None` once its senders are gone), or the stall line if a
/// decoder call stalls while waiting.
pub fn recv_watched<T>(rx: &mpsc::Receiver<T>) -> Result<Option<T>, String> {
    loop {
        match rx.recv_timeout(POLL) {
            Ok(value) => return Ok(Some(value)),
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(None),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(line) = stalled() {
                    return Err(line);
                }
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

    #[test]
    fn work_off_the_thread_returns_its_value_or_its_panic() {
        assert_eq!(off_thread(|| 6 * 7), Ok(42));
        let (tx, rx) = mpsc::channel();
        tx.send(1).unwrap();
        drop(tx);
        assert_eq!(recv_watched(&rx), Ok(Some(1)));
        assert_eq!(recv_watched(&rx), Ok(None));
        let panicked = std::panic::catch_unwind(|| off_thread(|| -> i32 { panic!("inside") }));
        assert!(panicked.is_err());
    }
}
