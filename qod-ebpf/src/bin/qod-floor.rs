//! The floor probe: the least a tc classifier that treats sessions can do, measured beside qod's
//! classifier by `cargo xtask bench classifier` (never attached by qodd).
//!
//! It reads the Ethernet type and the IPv4 destination, looks that address up in one hash map,
//! and on a hit counts the packet in a per-CPU slot and sets `skb->priority`. No VLANs, no IPv6,
//! no ports, no expiry, no policer, no DSCP: what is left is what every classifier pays. Beside
//! it, `qod_empty` returns at once: what the harness costs.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};

/// IPv4 destination (network byte order) -> `[skb->priority, counter slot]`.
#[map]
static QOD_FLOOR_FLOWS: HashMap<u32, [u32; 2]> = HashMap::with_max_entries(1 << 20, 0);

/// Per-CPU `[packets, bytes]` by slot.
#[map]
static QOD_FLOOR_COUNTERS: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1 << 20, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;

#[classifier]
pub fn qod_floor(ctx: TcContext) -> i32 {
    let start = ctx.data();
    // Ethernet header and the IPv4 header up to the destination address.
    if start + ETH_HLEN + 20 > ctx.data_end() {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: bounds-checked above; headers carry no alignment guarantee.
    let (proto, dst) = unsafe {
        (
            core::ptr::read_unaligned((start + 12) as *const u16),
            core::ptr::read_unaligned((start + ETH_HLEN + 16) as *const u32),
        )
    };
    if u16::from_be(proto) != ETH_P_IP {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: the value is copied out at once.
    let Some(&[priority, slot]) = (unsafe { QOD_FLOOR_FLOWS.get(dst) }) else {
        return TC_ACT_UNSPEC;
    };
    if let Some(c) = QOD_FLOOR_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot: no other CPU writes it, and the program is not re-entered on
        // the same CPU while it runs.
        unsafe {
            (*c)[0] += 1;
            (*c)[1] += u64::from(ctx.len());
        }
    }
    // SAFETY: the context pointer the kernel handed us; `priority` is writable from tc programs.
    unsafe { (*ctx.skb.skb).priority = priority };
    TC_ACT_UNSPEC
}

/// Nothing at all: what the harness itself costs a run.
#[classifier]
pub fn qod_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
