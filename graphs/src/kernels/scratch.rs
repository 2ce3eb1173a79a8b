//! Per-thread scratch buffers and uninitialised outputs.
//!
//! Kernels pad / re-layout one image at a time into a buffer that stays in cache; keeping those
//! buffers per thread across calls means they are allocated (and page-faulted) once, not per call.

use std::cell::RefCell;
use std::mem::MaybeUninit;

/// Scratch slots a kernel can hold at the same time.
#[derive(Clone, Copy, Debug)]
pub enum Slot {
    A = 0,
    B = 1,
    C = 2,
}

thread_local! {
    static BUFS: [RefCell<Vec<f32>>; 3] = const {
        [RefCell::new(Vec::new()), RefCell::new(Vec::new()), RefCell::new(Vec::new())]
    };
}

/// Runs `f` with this thread's buffer `slot`, at least `len` floats long. The contents are
/// whatever the last user left (callers write before they read). Not re-entrant per slot.
pub fn with<R>(slot: Slot, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    BUFS.with(|b| {
        let mut v = b[slot as usize].borrow_mut();
        if v.len() < len {
            // Grow once to the largest size seen; zeroed only here.
            v.resize(len, 0.0);
        }
        f(&mut v[..len])
    })
}

/// A `Vec<f32>` of `len` elements written by `init`: the kernels overwrite every output element,
/// so zero-filling first would be a wasted pass over memory.
///
/// # Safety
/// `init` must write all `len` elements behind the pointer it gets.
pub unsafe fn filled_by(len: usize, init: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v: Vec<MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(len) };
    init(v.as_mut_ptr() as *mut f32);
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `init` wrote all `len` elements (the contract above); same allocation and layout.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, len, v.capacity()) }
}

/// A raw pointer that tasks of one parallel loop share, each writing a disjoint range.
#[derive(Clone, Copy, Debug)]
pub struct SendPtr(pub *mut f32);
// SAFETY: only used to hand disjoint output ranges to rayon tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// # Safety
    /// `off` must be within the allocation this pointer came from.
    #[inline]
    pub unsafe fn add(self, off: usize) -> *mut f32 {
        self.0.add(off)
    }
}
