//! The CUDA code CI never runs, on a GPU: the driver-API wrappers of `loss::cuda_ce` (device
//! lookup, error strings, the primary context pushed and popped around each call), and the CUDA
//! runtime's events of `model::CudaEvent` that the overlap waits on.
//!
//! Needs a CUDA GPU: without one each test says so on stderr and passes, unless
//! `MASKAUDIT_REQUIRE_CUDA=1` (set it where a GPU is expected), which makes that a failure.
//! `make gpu-check` runs these on a GPU machine (docs/guide.md, "On a GPU").

use std::ffi::{c_int, c_void};

use maskaudit_core::sys::Library;
use maskaudit_torch::loss::{self, cuda_ce};
use maskaudit_torch::model::{self, CudaEvent};
use tch::{Device, Kind, Tensor};

fn cuda() -> Option<Device> {
    let required = std::env::var_os("MASKAUDIT_REQUIRE_CUDA").is_some_and(|v| v == "1");
    let why = match model::load_cuda_backend() {
        Err(e) => e,
        Ok(()) if tch::Cuda::device_count() == 0 => "no CUDA device".to_string(),
        Ok(()) => return Some(Device::Cuda(0)),
    };
    assert!(!required, "MASKAUDIT_REQUIRE_CUDA=1 but {why}");
    eprintln!("skipped: {why}");
    None
}

/// The CUDA context current on the calling thread (`cuCtxGetCurrent`), as an address.
fn current_context() -> usize {
    type GetCurrent = unsafe extern "C" fn(*mut *mut c_void) -> c_int;
    let driver = Library::open("libcuda.so.1").expect("libcuda.so.1");
    // SAFETY: cuCtxGetCurrent's declaration in cuda.h; it writes one pointer.
    unsafe {
        let get: GetCurrent = driver.get(c"cuCtxGetCurrent").expect("cuCtxGetCurrent");
        let mut context = std::ptr::null_mut();
        assert_eq!(get(&mut context), 0, "cuCtxGetCurrent");
        context as usize
    }
}

/// Fused losses and libtorch's for the same random logits, on the calling thread.
fn fused_and_libtorch(device: Device, seed: i64) -> (Tensor, Tensor) {
    let _guard = tch::no_grad_guard();
    tch::manual_seed(seed);
    let logits = Tensor::randn([3, 9, 1003], (Kind::Float, device));
    let ids = Tensor::randint(1003, [3, 9], (Kind::Int64, device));
    let fused = cuda_ce::queue_token_losses(&logits, &ids)
        .unwrap()
        .expect("the fused kernel runs on this GPU");
    let reference =
        loss::queue_libtorch_token_losses(&logits, &ids, loss::CUDA_CHUNK_ELEMENTS).unwrap();
    assert!(bool::try_from(&fused.finite).unwrap());
    (
        fused.losses.to_device(Device::Cpu),
        reference.losses.to_device(Device::Cpu),
    )
}

fn assert_close(fused: &Tensor, reference: &Tensor, what: &str) {
    let worst = ((fused - reference).abs() / (reference.abs() * 1e-6 + 2e-6))
        .max()
        .double_value(&[]);
    assert!(worst <= 1.0, "{what}: {worst} of the tolerance");
}

/// The kernels load on the GPU; an ordinal past the last device is the driver's error, in
/// words, not a panic, and it does not spoil device 0.
#[test]
fn the_driver_names_a_device_that_does_not_exist() {
    if cuda().is_none() {
        return;
    }
    assert_eq!(cuda_ce::available(0), Ok(()));
    let past = tch::Cuda::device_count() as usize;
    let err = cuda_ce::available(past).unwrap_err();
    assert!(err.contains("cuDeviceGet failed: CUDA error 101"), "{err}");
    assert!(err.contains("invalid device ordinal"), "{err}");
    // Asked again, the same answer (remembered), and device 0 still works.
    assert_eq!(cuda_ce::available(past).unwrap_err(), err);
    assert_eq!(cuda_ce::available(0), Ok(()));
    assert!(cuda_ce::kernels_origin().is_some());
}

/// A thread that never touched CUDA has no current context: the kernel's launch pushes the
/// device's primary context and pops it again, leaving the thread as it found it, and computes
/// what libtorch computes. On a thread where libtorch made the context current, that context
/// stays current.
#[test]
fn a_launch_leaves_the_threads_context_as_it_found_it() {
    let Some(device) = cuda() else { return };
    let fresh = std::thread::spawn(move || {
        let before = current_context();
        let (fused, reference) = fused_and_libtorch(device, 21);
        // libtorch's own calls may have made its context current; the kernel's launch must
        // not have changed what is current now. Measured around the launch alone:
        let logits = Tensor::randn([2, 4, 64], (Kind::Float, device));
        let ids = Tensor::randint(64, [2, 4], (Kind::Int64, device));
        let around = current_context();
        let _ = cuda_ce::queue_token_losses(&logits, &ids).unwrap().unwrap();
        assert_eq!(
            current_context(),
            around,
            "current context after the launch"
        );
        (before, fused, reference)
    })
    .join()
    .expect("the thread's launch");
    let (before, fused, reference) = fresh;
    assert_eq!(before, 0, "a fresh thread has no current context");
    assert_close(&fused, &reference, "on a fresh thread");

    let (fused, reference) = fused_and_libtorch(device, 22);
    assert_close(&fused, &reference, "on the test's thread");
}

/// The fused losses of a batch's first columns, from logits with padding columns appended (a
/// batch rounded up to fewer shapes): the losses of those columns alone, and a non-finite
/// logit in an appended column is not the batch's. Bit for bit where every logits row starts
/// on a 16-byte boundary (1024); with 1003 a row's alignment, and so the kernel's split into
/// scalars and vectors and its order of summing, depends on T: equal to float rounding.
#[test]
fn losses_of_the_first_columns_are_those_of_the_batch_alone() {
    let Some(device) = cuda() else { return };
    let _guard = tch::no_grad_guard();
    tch::manual_seed(40);
    for (kind, vocab) in [
        (Kind::Float, 1003),
        (Kind::BFloat16, 1003),
        (Kind::Float, 1024),
        (Kind::BFloat16, 1024),
    ] {
        let (t, extra) = (9, 7);
        let logits =
            (Tensor::randn([3, t + extra, vocab], (Kind::Float, device)) * 4.0).to_kind(kind);
        let ids = Tensor::randint(vocab, [3, t + extra], (Kind::Int64, device));
        let alone = cuda_ce::queue_token_losses(
            &logits.narrow(1, 0, t).contiguous(),
            &ids.narrow(1, 0, t).contiguous(),
        )
        .unwrap()
        .unwrap();
        let of = cuda_ce::queue_token_losses_of(&logits, &ids, t)
            .unwrap()
            .unwrap();
        assert_eq!(of.losses.size(), vec![3, t - 1], "{kind:?} {vocab}");
        if vocab % 8 == 0 {
            assert!(of.losses.equal(&alone.losses), "{kind:?} {vocab}");
        } else {
            assert_close(&of.losses, &alone.losses, &format!("{kind:?} {vocab}"));
        }
        assert!(bool::try_from(&of.finite).unwrap(), "{kind:?} {vocab}");
        let _ = logits.select(1, t + 2).fill_(f64::NAN);
        let of = cuda_ce::queue_token_losses_of(&logits, &ids, t)
            .unwrap()
            .unwrap();
        assert!(bool::try_from(&of.finite).unwrap(), "{kind:?} {vocab}");
        let _ = logits.select(1, t - 2).fill_(f64::NAN);
        let of = cuda_ce::queue_token_losses_of(&logits, &ids, t)
            .unwrap()
            .unwrap();
        assert!(!bool::try_from(&of.finite).unwrap(), "{kind:?} {vocab}");
    }
}

/// Launches from several threads at once all land on the legacy default stream in some order
/// and each computes its own losses.
#[test]
fn launches_from_several_threads_at_once_are_each_right() {
    let Some(device) = cuda() else { return };
    let threads: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || fused_and_libtorch(device, 30 + i)))
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let (fused, reference) = t.join().expect("thread");
        assert_close(&fused, &reference, &format!("thread {i}"));
    }
}

/// An event recorded after a non-blocking copy to pinned host memory completes only once the
/// copy has: the overlap reads a batch's losses on that promise. Timed events give a GPU time;
/// untimed ones do not; a device that does not exist gives no event.
#[test]
fn an_event_waits_for_the_work_queued_before_it() {
    let Some(device) = cuda() else { return };
    let _guard = tch::no_grad_guard();
    tch::manual_seed(5);
    for round in 0..3 {
        let a = Tensor::randn([512, 512], (Kind::Float, device));
        let start = CudaEvent::record_timed(0).expect("a timed event");
        // Enough work that the host would read too early if the event did not wait for it.
        let mut x = a.shallow_clone();
        for _ in 0..10 {
            x = x.matmul(&a) / 23.0;
        }
        let sums = x.sum_dim_intlist(1, false, Kind::Float);
        // Into pinned host memory (libtorch's non-blocking copy to the CPU), as the overlap does.
        let queued = sums.to_device_(Device::Cpu, Kind::Float, true, false);
        let done = CudaEvent::record_timed(0).expect("a timed event");
        done.wait().expect("cudaEventSynchronize");
        let got = Vec::<f32>::try_from(&queued).unwrap();
        let want = Vec::<f32>::try_from(&sums.to_device(Device::Cpu)).unwrap();
        assert_eq!(got.len(), 512);
        assert_eq!(
            got, want,
            "round {round}: the copy had landed when the event completed"
        );
        let ms = start.elapsed_ms(&done).expect("both events timed");
        assert!(ms.is_finite() && ms >= 0.0, "round {round}: {ms} ms");
    }
    let plain = CudaEvent::record(0).expect("an event");
    let later = CudaEvent::record(0).expect("an event");
    later.wait().unwrap();
    plain.wait().unwrap();
    assert_eq!(
        plain.elapsed_ms(&later),
        None,
        "untimed events have no time"
    );
    let past = tch::Cuda::device_count() as usize;
    assert!(
        CudaEvent::record(past).is_none(),
        "device {past} does not exist"
    );
}

/// Many events made and dropped: each is destroyed (a leak would run the driver out of
/// handles long before this many on some drivers; here it must at least never fail).
#[test]
fn events_are_made_and_destroyed_many_times() {
    if cuda().is_none() {
        return;
    }
    for i in 0..20_000 {
        let e = CudaEvent::record(0).unwrap_or_else(|| panic!("event {i}"));
        if i % 5_000 == 0 {
            e.wait().unwrap();
        }
    }
}
