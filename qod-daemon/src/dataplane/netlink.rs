//! HTB classes and their leaf FIFOs over rtnetlink, without forking `tc`.
//!
//! The per-session class operations (replace a class and its leaf, delete a class) are the hot
//! path of a scheduled create or end: `tc` costs two fork/execs per interface per session, this
//! one `sendmsg` and one acknowledgement read per message, with a deadline on every read.
//! Messages are what iproute2 sends: `RTM_NEWTCLASS` with an `htb` kind and nested
//! `TCA_HTB_PARMS` (rates as `tc_ratespec` with an Ethernet link layer, so the kernel needs no
//! rate tables, and `TCA_HTB_RATE64` / `TCA_HTB_CEIL64` past 32 bits of bytes per second),
//! `RTM_NEWQDISC` with a `pfifo` and its `tc_fifo_qopt`, `RTM_DELTCLASS`. No crate we could use
//! encodes HTB's attributes, so they are written here, on the plain netlink framing.

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    time::Duration,
};

use super::scheduler::Leaf;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};

const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTCLASS: u16 = 40;
const RTM_GETQDISC: u16 = 38;
const RTM_GETTCLASS: u16 = 42;
const TCA_STATS2: u16 = 7;
const TCA_STATS_BASIC: u16 = 1;
const TCA_STATS_QUEUE: u16 = 3;
const TCA_STATS_PKT64: u16 = 8;
/// `TC_H_ROOT`: the parent of a root qdisc.
pub const TC_H_ROOT: u32 = 0xffff_ffff;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// Send the answer back to the requester: a tc `GET` answers the `RTNLGRP_TC` group otherwise.
const NLM_F_ECHO: u16 = 0x8;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// The kernel's psched ticks are 64 ns (`PSCHED_SHIFT` 6), whatever `/proc/net/psched` says.
const PSCHED_TICK_NS: u128 = 64;

/// One netlink message of a datagram: its type, sequence number and what follows the header.
pub struct Message<'a> {
    pub kind: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// The messages in one received datagram (a truncated tail is ignored).
pub fn messages(buf: &[u8]) -> impl Iterator<Item = Message<'_>> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let header = buf.get(off..off + 16)?;
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        let seq = u32::from_ne_bytes([header[8], header[9], header[10], header[11]]);
        if len < 16 {
            return None;
        }
        let payload = buf.get(off + 16..off + len)?;
        off += (len + 3) & !3;
        Some(Message { kind, seq, payload })
    })
}

/// The attributes (`rtattr`: type, payload) in `buf`.
pub fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let header = buf.get(off..off + 4)?;
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let kind = u16::from_ne_bytes([header[2], header[3]]);
        if len < 4 {
            return None;
        }
        let payload = buf.get(off + 4..off + len)?;
        off += (len + 3) & !3;
        Some((kind, payload))
    })
}

/// One HTB class as the kernel takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtbClass {
    pub ifindex: u32,
    pub parent: u32,
    pub classid: u32,
    pub rate_bps: u64,
    pub ceil_bps: u64,
    pub burst_bytes: u64,
    pub cburst_bytes: u64,
    pub quantum: u32,
    pub prio: u8,
}

/// What a qdisc or class reports of itself (`TCA_STATS2`): sent (for an HTB class: what left
/// its queue, after shaping), dropped (its leaf queue was full), and what it holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcStats {
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
    pub overlimits: u64,
    pub backlog_bytes: u64,
    pub backlog_packets: u64,
}

impl TcStats {
    /// `self` less `other`, field by field (never below zero).
    pub fn minus(self, other: Self) -> Self {
        Self {
            packets: self.packets.saturating_sub(other.packets),
            bytes: self.bytes.saturating_sub(other.bytes),
            drops: self.drops.saturating_sub(other.drops),
            overlimits: self.overlimits.saturating_sub(other.overlimits),
            backlog_bytes: self.backlog_bytes.saturating_sub(other.backlog_bytes),
            backlog_packets: self.backlog_packets.saturating_sub(other.backlog_packets),
        }
    }
}

fn word(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 4).map_or(0, |w| {
        u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
    })
}

fn dword(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |w| {
        u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
    })
}

/// The statistics in an `RTM_NEWQDISC` / `RTM_NEWTCLASS` payload (`tcmsg`, then attributes).
pub fn parse_stats(payload: &[u8]) -> TcStats {
    let mut out = TcStats::default();
    let Some(attrs) = payload.get(20..) else {
        return out;
    };
    for (kind, value) in attributes(attrs) {
        if kind != TCA_STATS2 {
            continue;
        }
        for (kind, v) in attributes(value) {
            match kind {
                // struct gnet_stats_basic { __u64 bytes; __u32 packets; }
                TCA_STATS_BASIC => {
                    out.bytes = dword(v, 0);
                    out.packets = out.packets.max(word(v, 8));
                }
                TCA_STATS_PKT64 => out.packets = dword(v, 0),
                // struct gnet_stats_queue { qlen, backlog, drops, requeues, overlimits }
                TCA_STATS_QUEUE => {
                    out.backlog_packets = word(v, 0);
                    out.backlog_bytes = word(v, 4);
                    out.drops = word(v, 8);
                    out.overlimits = word(v, 16);
                }
                _ => {}
            }
        }
    }
    out
}

/// A netlink route socket with a read deadline.
#[derive(Debug)]
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
    /// Receive buffer, kept across exchanges (the hot path allocates nothing).
    buf: Vec<u8>,
}

/// A message being built: header, fixed part, attributes (4-byte aligned).
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32) -> Self {
        let mut b = Vec::with_capacity(128);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        Self(b)
    }

    /// `struct tcmsg`.
    fn tcmsg(mut self, ifindex: u32, handle: u32, parent: u32) -> Self {
        self.0.extend_from_slice(&[0u8, 0, 0, 0]); // family AF_UNSPEC, padding
        self.0.extend_from_slice(&ifindex.to_ne_bytes());
        self.0.extend_from_slice(&handle.to_ne_bytes());
        self.0.extend_from_slice(&parent.to_ne_bytes());
        self.0.extend_from_slice(&0u32.to_ne_bytes()); // info
        self
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.0
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    /// Starts a nested attribute; `end_nest` with the returned offset closes it.
    fn begin_nest(&mut self, kind: u16) -> usize {
        let at = self.0.len();
        self.0.extend_from_slice(&0u16.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        at
    }

    fn end_nest(&mut self, at: usize) {
        let len = u16::try_from(self.0.len() - at).unwrap_or(u16::MAX);
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.0.len()).unwrap_or(u32::MAX);
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// `struct tc_ratespec` for `bytes_per_s` (saturated at 32 bits; RATE64 carries the rest).
fn ratespec(bytes_per_s: u64) -> [u8; 12] {
    let mut r = [0u8; 12];
    r[1] = TC_LINKLAYER_ETHERNET;
    let rate = u32::try_from(bytes_per_s).unwrap_or(u32::MAX);
    r[8..12].copy_from_slice(&rate.to_ne_bytes());
    r
}

/// Time to send `bytes` at `bytes_per_s`, in psched ticks (HTB's `buffer` / `cbuffer`).
/// Rounded up, so the kernel's burst is never short of the one asked for.
fn ticks(bytes: u64, bytes_per_s: u64) -> u32 {
    let per_tick = u128::from(bytes_per_s.max(1)) * PSCHED_TICK_NS;
    let ticks = (u128::from(bytes) * 1_000_000_000).div_ceil(per_tick);
    u32::try_from(ticks).unwrap_or(u32::MAX)
}

/// The `RTM_NEWTCLASS` payload (`tcmsg` and attributes) of `c`.
fn class_message(c: &HtbClass, seq: u32) -> Vec<u8> {
    let (rate, ceil) = (c.rate_bps / 8, c.ceil_bps / 8);
    let mut m = Msg::new(RTM_NEWTCLASS, NLM_F_CREATE, seq).tcmsg(c.ifindex, c.classid, c.parent);
    m.attr(TCA_KIND, b"htb\0");
    let nest = m.begin_nest(TCA_OPTIONS);
    // struct tc_htb_opt: rate, ceil, buffer, cbuffer, quantum, level, prio.
    let mut opt = Vec::with_capacity(44);
    opt.extend_from_slice(&ratespec(rate));
    opt.extend_from_slice(&ratespec(ceil));
    opt.extend_from_slice(&ticks(c.burst_bytes, rate).to_ne_bytes());
    opt.extend_from_slice(&ticks(c.cburst_bytes, ceil).to_ne_bytes());
    opt.extend_from_slice(&c.quantum.to_ne_bytes());
    opt.extend_from_slice(&0u32.to_ne_bytes());
    opt.extend_from_slice(&u32::from(c.prio).to_ne_bytes());
    m.attr(TCA_HTB_PARMS, &opt);
    if rate > u64::from(u32::MAX) {
        m.attr(TCA_HTB_RATE64, &rate.to_ne_bytes());
    }
    if ceil > u64::from(u32::MAX) {
        m.attr(TCA_HTB_CEIL64, &ceil.to_ne_bytes());
    }
    m.end_nest(nest);
    m.finish()
}

impl Rtnl {
    /// A socket whose every acknowledgement must arrive within `deadline`.
    pub fn open(deadline: Duration) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        let tv = nix::sys::time::TimeVal::new(
            i64::try_from(deadline.as_secs()).unwrap_or(i64::MAX),
            i64::from(deadline.subsec_micros()),
        );
        setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0u8; 16 << 10],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `messages` (already numbered `first..`) and waits for each acknowledgement; the
    /// first error the kernel reports is returned (every message is still acknowledged).
    fn exchange(&mut self, messages: &[(u32, Vec<u8>)]) -> io::Result<()> {
        self.exchange_with(messages, |_| {})
    }

    /// The statistics of the qdisc (`RTM_GETQDISC`) or class (`RTM_GETTCLASS`) `handle` of
    /// `parent` on `ifindex`.
    pub fn stats(
        &mut self,
        kind: u16,
        ifindex: u32,
        handle: u32,
        parent: u32,
    ) -> io::Result<TcStats> {
        let seq = self.next_seq();
        let m = Msg::new(kind, NLM_F_ECHO, seq)
            .tcmsg(ifindex, handle, parent)
            .finish();
        let mut found = None;
        self.exchange_with(&[(seq, m)], |reply| {
            if matches!(reply.kind, RTM_NEWQDISC | RTM_NEWTCLASS) && reply.seq == seq {
                found = Some(parse_stats(reply.payload));
            }
        })?;
        found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no statistics in the reply"))
    }

    /// The statistics of HTB class `classid` on `ifindex`.
    pub fn class_stats(&mut self, ifindex: u32, classid: u32) -> io::Result<TcStats> {
        self.stats(RTM_GETTCLASS, ifindex, classid, 0)
    }

    /// The statistics of the root qdisc `handle` on `ifindex`.
    pub fn root_stats(&mut self, ifindex: u32, handle: u32) -> io::Result<TcStats> {
        self.stats(RTM_GETQDISC, ifindex, handle, TC_H_ROOT)
    }

    /// [`Self::exchange`], handing every other message of the replies to `reply`.
    fn exchange_with(
        &mut self,
        messages: &[(u32, Vec<u8>)],
        mut reply: impl FnMut(&Message<'_>),
    ) -> io::Result<()> {
        let mut batch = Vec::new();
        for (_, m) in messages {
            batch.extend_from_slice(m);
        }
        send(self.fd.as_raw_fd(), &batch, MsgFlags::empty())?;
        let mut pending: Vec<u32> = messages.iter().map(|(s, _)| *s).collect();
        let mut first_error = None;
        while !pending.is_empty() {
            let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()).map_err(|e| {
                if e == nix::errno::Errno::EAGAIN {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no netlink acknowledgement in time",
                    )
                } else {
                    io::Error::from(e)
                }
            })?;
            for m in self::messages(&self.buf[..n]) {
                if m.kind != NLMSG_ERROR {
                    reply(&m);
                }
                if m.kind == NLMSG_ERROR && m.payload.len() >= 4 {
                    let errno = i32::from_ne_bytes([
                        m.payload[0],
                        m.payload[1],
                        m.payload[2],
                        m.payload[3],
                    ]);
                    pending.retain(|s| *s != m.seq);
                    if errno != 0 && first_error.is_none() {
                        first_error = Some(io::Error::from_raw_os_error(-errno));
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Creates or changes HTB class `c` and gives it a FIFO leaf (`pfifo` of a length in
    /// packets, `bfifo` in bytes) with handle `handle` (major:0), in one exchange that also reads
    /// the class's statistics after the change.
    /// A leaf of another kind (a class index reused with another kind of FIFO) cannot be changed
    /// in place (EINVAL): it is deleted and made again.
    pub fn replace_class(&mut self, c: &HtbClass, handle: u32, leaf: Leaf) -> io::Result<TcStats> {
        match self.replace_class_once(c, handle, leaf) {
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINVAL as i32) => {
                let seq = self.next_seq();
                let del = Msg::new(RTM_DELQDISC, 0, seq)
                    .tcmsg(c.ifindex, handle, c.classid)
                    .finish();
                // Gone already is fine: what matters is the exchange below.
                let _ = self.exchange(&[(seq, del)]);
                self.replace_class_once(c, handle, leaf)
            }
            other => other,
        }
    }

    fn replace_class_once(&mut self, c: &HtbClass, handle: u32, leaf: Leaf) -> io::Result<TcStats> {
        let class_seq = self.next_seq();
        let class = class_message(c, class_seq);
        let leaf_seq = self.next_seq();
        let mut q = Msg::new(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE, leaf_seq)
            .tcmsg(c.ifindex, handle, c.classid);
        let (kind, limit): (&[u8], u32) = match leaf {
            Leaf::Packets(n) => (b"pfifo\0", n),
            Leaf::Bytes(n) => (b"bfifo\0", n),
        };
        q.attr(TCA_KIND, kind);
        // struct tc_fifo_qopt.
        q.attr(TCA_OPTIONS, &limit.to_ne_bytes());
        let stats_seq = self.next_seq();
        let get = Msg::new(RTM_GETTCLASS, NLM_F_ECHO, stats_seq)
            .tcmsg(c.ifindex, c.classid, 0)
            .finish();
        let mut found = None;
        self.exchange_with(
            &[(class_seq, class), (leaf_seq, q.finish()), (stats_seq, get)],
            |reply| {
                if reply.kind == RTM_NEWTCLASS && reply.seq == stats_seq {
                    found = Some(parse_stats(reply.payload));
                }
            },
        )?;
        found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no statistics in the reply"))
    }

    /// Changes HTB class `c` alone (its leaf stays).
    pub fn change_class(&mut self, c: &HtbClass) -> io::Result<()> {
        let seq = self.next_seq();
        let m = class_message(c, seq);
        self.exchange(&[(seq, m)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_class_message_carries_what_iproute2_sends() {
        let c = HtbClass {
            ifindex: 7,
            parent: 0x0001_0001,
            classid: 0x0001_0100,
            rate_bps: 20_000_000,
            ceil_bps: 100_000_000,
            burst_bytes: 15_140,
            cburst_bytes: 15_140,
            quantum: 1514,
            prio: 2,
        };
        let m = class_message(&c, 9);
        // nlmsghdr 16 + tcmsg 20 + kind 8 + options (4 + parms 4 + 44) = 96.
        assert_eq!(m.len(), 96);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().expect("len")), 96);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWTCLASS);
        assert_eq!(
            u32::from_ne_bytes(m[20..24].try_into().expect("ifindex")),
            7
        );
        assert_eq!(&m[40..44], b"htb\0");
        // Rate in bytes/s at tc_ratespec offset 8, after the 4+4 option headers.
        let parms = 52;
        assert_eq!(
            u32::from_ne_bytes(m[parms + 8..parms + 12].try_into().expect("rate")),
            2_500_000
        );
        assert_eq!(m[parms + 1], TC_LINKLAYER_ETHERNET);
        // buffer: 15,140 B at 2.5 MB/s = 6.056 ms = 94,625 ticks of 64 ns.
        assert_eq!(
            u32::from_ne_bytes(m[parms + 24..parms + 28].try_into().expect("buffer")),
            94_625
        );
        // cbuffer: 15,140 B at 12.5 MB/s = 1.2112 ms = 18,925 ticks.
        assert_eq!(
            u32::from_ne_bytes(m[parms + 28..parms + 32].try_into().expect("cbuffer")),
            18_925
        );
    }

    #[test]
    fn rates_past_32_bits_of_bytes_go_in_rate64() {
        let c = HtbClass {
            ifindex: 1,
            parent: 1,
            classid: 2,
            rate_bps: 40_000_000_000,
            ceil_bps: 40_000_000_000,
            burst_bytes: 1,
            cburst_bytes: 1,
            quantum: 1514,
            prio: 0,
        };
        assert_eq!(class_message(&c, 1).len(), 96 + 2 * 12);
    }
}
