use std::os::fd::{AsRawFd as _, BorrowedFd};

use anyhow::ensure;

const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// `sizeof(struct __sk_buff)` in this kernel's UAPI.
const SKB_CTX_WORDS: usize = 48;
/// Index of `priority` in `struct __sk_buff` viewed as `u32`s.
const SKB_PRIORITY: usize = 8;

/// The `test` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// What one run produced.
#[derive(Debug)]
pub struct RunResult {
    pub retval: i32,
    /// The packet after the program ran.
    pub data: Vec<u8>,
    /// `skb->priority` after the program ran.
    pub priority: u32,
    /// Average nanoseconds per run, as the kernel measured it.
    pub ns_per_run: u32,
}

/// Runs the program `repeat` times on `packet` (an Ethernet frame).
pub fn test_run(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> anyhow::Result<RunResult> {
    let mut out = vec![0u8; packet.len() + 256];
    let ctx_in = [0u32; SKB_CTX_WORDS];
    let mut ctx_out = [0u32; SKB_CTX_WORDS];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ctx_size_in: (SKB_CTX_WORDS * 4) as u32,
        ctx_size_out: (SKB_CTX_WORDS * 4) as u32,
        ctx_in: ctx_in.as_ptr() as u64,
        ctx_out: ctx_out.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: attr points at buffers that outlive the call, with their sizes set.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    ensure!(
        rc == 0,
        "BPF_PROG_TEST_RUN: {}",
        std::io::Error::last_os_error()
    );
    out.truncate(attr.data_size_out as usize);
    Ok(RunResult {
        retval: attr.retval as i32,
        data: out,
        priority: ctx_out[SKB_PRIORITY],
        ns_per_run: attr.duration,
    })
}

pub const MAC_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
pub const MAC_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// Ethernet header, with 802.1Q tags (VLAN ids) before the ethertype.
pub fn eth(ethertype: u16, vlans: &[u16], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 22);
    f.extend_from_slice(&MAC_DST);
    f.extend_from_slice(&MAC_SRC);
    for vid in vlans {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// UDP (17) or TCP (6) header with the given ports, then `payload` bytes.
pub fn l4(protocol: u8, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    if protocol == 6 {
        h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        h.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
        h.extend_from_slice(&[0, 0]);
    }
    h.extend(std::iter::repeat_n(0xabu8, payload));
    h
}

/// Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 packet; `options` must be a multiple of 4 bytes; `frag` is the flags+offset field.
pub fn ipv4(
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    tos: u8,
    options: &[u8],
    frag: u16,
    body: &[u8],
) -> Vec<u8> {
    let ihl = 5 + options.len() / 4;
    let total = ihl * 4 + body.len();
    let mut h = vec![(4 << 4) | ihl as u8, tos];
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, protocol, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(options);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(body);
    h
}

/// IPv6 packet; `ext` is a list of (header type, bytes without the next-header byte).
pub fn ipv6(
    src: [u8; 16],
    dst: [u8; 16],
    protocol: u8,
    tclass: u8,
    flow: u32,
    ext: &[(u8, Vec<u8>)],
    body: &[u8],
) -> Vec<u8> {
    let mut chain = Vec::new();
    let types: Vec<u8> = ext.iter().map(|(t, _)| *t).chain([protocol]).collect();
    for (i, (_, bytes)) in ext.iter().enumerate() {
        chain.push(types[i + 1]);
        chain.extend_from_slice(bytes);
    }
    let first = (6u32 << 28) | (u32::from(tclass) << 20) | (flow & 0xfffff);
    let mut h = first.to_be_bytes().to_vec();
    h.extend_from_slice(&((chain.len() + body.len()) as u16).to_be_bytes());
    h.push(types[0]);
    h.push(64);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&chain);
    h.extend_from_slice(body);
    h
}
