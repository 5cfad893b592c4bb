//! Whole-map reads a batch at a time (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6+): one system call for up
//! to [`BATCH`] entries, where aya's iterators make one per key. aya 0.14 has no batch calls;
//! this is the one qodd needs (listing a hash map's keys at start, to find orphans).

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call.
const BATCH: usize = 1024;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h). The kernel reads the
/// size given and takes the rest of its union as zero.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of the hash map `map` (keys `K`, values `V`), handed to `each` a batch at a
/// time. An error if the kernel refuses batches (the caller then walks key by key). The map may
/// change meanwhile: each hash bucket is copied whole under its lock, so an entry present
/// throughout the walk is seen exactly once, one added or removed during it perhaps not.
pub(super) fn hash_entries<K: Copy + Default, V: Copy + Default>(
    map: BorrowedFd<'_>,
    mut each: impl FnMut(&[K], &[V]),
) -> io::Result<()> {
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![V::default(); BATCH];
    // The hash map's position is a bucket index (u32); 8 bytes leave room.
    let (mut from, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const from as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers for `count` keys and `count` values (of the map's
        // key and value sizes: the caller's `K` and `V`) and at two 8-byte positions, all alive
        // across the call; the kernel writes no more than that, and the number of entries it
        // filled back into `attr.count`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let error = (r < 0).then(io::Error::last_os_error);
        // ENOENT ends the walk; the last batch (possibly empty) is filled all the same.
        match error {
            Some(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
            done => {
                let n = (attr.count as usize).min(BATCH);
                each(&keys[..n], &values[..n]);
                if done.is_some() {
                    return Ok(());
                }
            }
        }
        from = next;
        first = false;
    }
}
