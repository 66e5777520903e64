//! The emulation tests' allocator: the system's, reporting every allocation and free to the
//! kernels' CPU emulation (`camex_emu_track`), so that a kernel's access to global memory outside
//! every live allocation fails its launch (as memcheck would flag it on a GPU) instead of reading
//! or writing the host's heap. In a GPU build the report is a no-op. An allocation is its whole
//! capacity (a `Vec` grown by `push` may hold more than its length), so an overrun into the spare
//! capacity is not seen: the tests size their buffers exactly (`vec![x; n]`).

use std::alloc::{GlobalAlloc, Layout, System};

struct Tracked;

fn track(p: *mut u8, bytes: usize, live: bool) {
    // SAFETY: the call only records the range; it allocates with C++'s own allocator, not this one.
    unsafe { camex::ffi::camex_emu_track(p as u64, bytes as i64, live as i32) }
}

// SAFETY: every method forwards to System and only reports what System did.
unsafe impl GlobalAlloc for Tracked {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(p, layout.size(), true);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            track(p, layout.size(), true);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // Forgotten first: once freed, another thread may be given the same address.
        track(p, 0, false);
        unsafe { System.dealloc(p, layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(p, 0, false);
        let q = unsafe { System.realloc(p, layout, new_size) };
        if q.is_null() {
            track(p, layout.size(), true);
        } else {
            track(q, new_size, true);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Tracked = Tracked;
