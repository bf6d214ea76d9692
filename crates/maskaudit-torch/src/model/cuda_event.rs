//! CUDA events, for waiting on part of the work queued on the GPU rather than all of it.
//!
//! tch has no binding for them, so the CUDA runtime's C functions are looked up, once, in the
//! libraries already loaded: `libtorch_cuda.so` is opened with `RTLD_GLOBAL`
//! ([`super::load_cuda_backend`]), which puts the CUDA runtime it links into the global scope.
//! Where they are not found, [`CudaEvent::record`] returns `None` and the caller synchronises
//! the whole device the ordinary way.
//!
//! Events are recorded on the legacy default stream (`0`), the stream libtorch queues all its
//! work on unless told otherwise; so an event completes once everything queued before it has.

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use crate::sys::Library;

type Event = *mut c_void;
type Stream = *mut c_void;

type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
type Create = unsafe extern "C" fn(*mut Event, u32) -> c_int;
type Record = unsafe extern "C" fn(Event, Stream) -> c_int;
type OnEvent = unsafe extern "C" fn(Event) -> c_int;
type Elapsed = unsafe extern "C" fn(*mut f32, Event, Event) -> c_int;

struct Runtime {
    set_device: SetDevice,
    create: Create,
    record: Record,
    synchronize: OnEvent,
    destroy: OnEvent,
    elapsed: Elapsed,
}

/// `cudaEventDisableTiming`: the event only orders work.
const DISABLE_TIMING: u32 = 2;

fn runtime() -> Option<&'static Runtime> {
    static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let scope = Library::global_scope();
            // SAFETY: these are the CUDA runtime's functions of these names, whose C signatures
            // are the ones declared in `Runtime` (cuda_runtime_api.h).
            unsafe {
                Some(Runtime {
                    set_device: scope.get(c"cudaSetDevice").ok()?,
                    create: scope.get(c"cudaEventCreateWithFlags").ok()?,
                    record: scope.get(c"cudaEventRecord").ok()?,
                    synchronize: scope.get(c"cudaEventSynchronize").ok()?,
                    destroy: scope.get(c"cudaEventDestroy").ok()?,
                    elapsed: scope.get(c"cudaEventElapsedTime").ok()?,
                })
            }
        })
        .as_ref()
}

/// An event recorded after the work queued so far on a GPU's default stream.
pub struct CudaEvent {
    event: Event,
    runtime: &'static Runtime,
}

impl CudaEvent {
    /// Records an event on device `index`'s default stream; `None` when the CUDA runtime's
    /// functions are not at hand or a call fails.
    pub fn record(index: usize) -> Option<Self> {
        Self::record_with(index, DISABLE_TIMING)
    }

    /// [`Self::record`], with the time the GPU reached it, for [`Self::elapsed_ms`]
    /// (`MASKAUDIT_TIMING=1`).
    pub fn record_timed(index: usize) -> Option<Self> {
        Self::record_with(index, 0)
    }

    fn record_with(index: usize, flags: u32) -> Option<Self> {
        let runtime = runtime()?;
        let mut event: Event = std::ptr::null_mut();
        // SAFETY: plain CUDA runtime calls on a pointer we own; libtorch made the device's
        // context. libtorch sets the current device around each of its calls and puts back the
        // one it found, so setting it here changes nothing for libtorch.
        unsafe {
            if (runtime.set_device)(index as c_int) != 0 || (runtime.create)(&mut event, flags) != 0
            {
                return None;
            }
            let this = Self { event, runtime };
            if (runtime.record)(event, std::ptr::null_mut()) != 0 {
                return None;
            }
            Some(this)
        }
    }

    /// Blocks until the work queued before the event has finished.
    pub fn wait(&self) -> Result<(), String> {
        // SAFETY: the event was created and recorded by `record`.
        match unsafe { (self.runtime.synchronize)(self.event) } {
            0 => Ok(()),
            code => Err(format!(
                "cudaEventSynchronize failed with CUDA error {code}"
            )),
        }
    }

    /// Milliseconds of GPU time from this event to `later`, both from [`Self::record_timed`]
    /// and both complete; `None` otherwise.
    pub fn elapsed_ms(&self, later: &CudaEvent) -> Option<f32> {
        let mut ms = 0f32;
        // SAFETY: both events were created and recorded by `record_with`.
        (unsafe { (self.runtime.elapsed)(&mut ms, self.event, later.event) } == 0).then_some(ms)
    }
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        // SAFETY: created by `record`, destroyed once.
        unsafe {
            (self.runtime.destroy)(self.event);
        }
    }
}
