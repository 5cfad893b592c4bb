//! The managed links' state, from rtnetlink link events.
//!
//! qodd subscribes to `RTNLGRP_LINK` and takes each `RTM_NEWLINK` / `RTM_DELLINK` for what it
//! says: an interface up and running, down, gone, or re-created under a new index. A link that
//! goes down or away ends every session (`NETWORK_TERMINATED`); a re-created one gets the
//! classifier and scheduler again, and sessions are accepted again once it is up.
//!
//! What cannot be read is never a link loss. When the event socket overflows (`ENOBUFS`: events
//! were lost) or cannot be read, and every `link_resync_secs` (30) besides, the state is read again in full
//! (`if_nametoindex` and `getifaddrs`); a read that fails (`EMFILE` when descriptors run out) is
//! logged and counted in `qod_link_read_failures_total`, and changes nothing. Without an event
//! socket at all, that full read runs every second.

use std::{
    collections::HashSet,
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, setsockopt,
    socket, sockopt,
};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{core::Core, dataplane::netlink};

/// Times the link state could not be read (each one logged; none counts as a link loss).
pub static LINK_READ_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Full re-read when there is no event socket.
const POLL: Duration = Duration::from_secs(1);

const RTMGRP_LINK: u32 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
const IFF_UP: u32 = 0x1;
const IFF_RUNNING: u32 = 0x40;

/// What is known of one link.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkSeen {
    /// It exists with this ifindex, up and running or not.
    Present { index: u32, up: bool },
    /// The kernel says there is no such interface.
    Gone,
    /// It could not be read (the error): nothing is known, so nothing changes.
    Unreadable(nix::errno::Errno),
}

/// One link event: the interface's index, its name, and its state.
#[derive(Debug, PartialEq, Eq)]
pub struct LinkEvent {
    pub index: u32,
    pub name: String,
    /// `None`: deleted.
    pub up: Option<bool>,
}

/// The link events in one datagram of the `RTNLGRP_LINK` group.
pub fn parse_events(buf: &[u8]) -> Vec<LinkEvent> {
    netlink::messages(buf)
        .filter(|m| m.kind == RTM_NEWLINK || m.kind == RTM_DELLINK)
        .filter_map(|m| {
            // struct ifinfomsg: family, pad, type (u16), index (i32), flags, change.
            let info = m.payload.get(..16)?;
            let index = u32::from_ne_bytes([info[4], info[5], info[6], info[7]]);
            let flags = u32::from_ne_bytes([info[8], info[9], info[10], info[11]]);
            let name = netlink::attributes(&m.payload[16..])
                .find(|(kind, _)| *kind == IFLA_IFNAME)
                .map(|(_, v)| {
                    let v = v.split(|b| *b == 0).next().unwrap_or_default();
                    String::from_utf8_lossy(v).into_owned()
                })?;
            let up = (m.kind == RTM_NEWLINK)
                .then_some(flags & (IFF_UP | IFF_RUNNING) == (IFF_UP | IFF_RUNNING));
            Some(LinkEvent { index, name, up })
        })
        .collect()
}

/// A non-blocking socket subscribed to link events.
fn subscribe() -> io::Result<AsyncFd<OwnedFd>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkRoute,
    )?;
    // Room for a burst of flaps before the kernel has to drop (ENOBUFS, then a full re-read).
    let _ = setsockopt(&fd, sockopt::RcvBuf, &(1 << 20));
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK))?;
    // SAFETY: an OwnedFd moved into the AsyncFd: the descriptor stays open and the same until
    // the AsyncFd drops it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Names of the interfaces that are up and running (one `getifaddrs` for every link), or why
/// they cannot be read now (e.g. `EMFILE` when descriptors run out).
fn running_links() -> nix::Result<HashSet<String>> {
    use nix::net::if_::InterfaceFlags;
    Ok(nix::ifaddrs::getifaddrs()?
        .filter(|a| {
            a.flags
                .contains(InterfaceFlags::IFF_UP | InterfaceFlags::IFF_RUNNING)
        })
        .map(|a| a.interface_name)
        .collect())
}

/// What the kernel says of interface `name` now, given one read of the running links.
fn read_state(name: &str, running: &nix::Result<HashSet<String>>) -> LinkSeen {
    match nix::net::if_::if_nametoindex(name) {
        Ok(index) => match running {
            Ok(running) => LinkSeen::Present {
                index,
                up: running.contains(name),
            },
            Err(e) => LinkSeen::Unreadable(*e),
        },
        Err(nix::errno::Errno::ENODEV) => LinkSeen::Gone,
        Err(e) => LinkSeen::Unreadable(e),
    }
}

/// What the watcher knows of one managed link.
struct Link {
    name: String,
    /// The ifindex the classifier (and scheduler) are attached to.
    attached: Option<u32>,
    up: bool,
}

impl Link {
    /// Acts on what is now known of the link.
    async fn apply(&mut self, core: &Arc<Core>, seen: LinkSeen) {
        // Calls that may change the scheduler go to the blocking pool.
        let changed = |up: bool| {
            let (core, name) = (core.clone(), self.name.clone());
            tokio::task::spawn_blocking(move || core.link_changed(&name, up))
        };
        match seen {
            LinkSeen::Unreadable(e) => {
                // Not a link loss: sessions stay, and the next read looks again.
                LINK_READ_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(interface = %self.name, error = %e, "cannot read the link state; nothing changes until it can be read");
            }
            LinkSeen::Present { index, up: true } => {
                if self.attached != Some(index) {
                    // Re-created: whatever ran on the old one is gone, so its sessions end
                    // before the new one is attached.
                    let _ = changed(false).await;
                    self.up = false;
                    let (c, name) = (core.clone(), self.name.clone());
                    match tokio::task::spawn_blocking(move || c.reattach(&name)).await {
                        Ok(Ok(())) => self.attached = Some(index),
                        Ok(Err(e)) => {
                            warn!(interface = %self.name, error = %crate::anyhow_like(&e), "cannot attach to the re-created interface");
                            return;
                        }
                        Err(_) => return,
                    }
                }
                if !self.up {
                    let _ = changed(true).await;
                    self.up = true;
                }
            }
            LinkSeen::Present { up: false, .. } | LinkSeen::Gone => {
                if self.up {
                    let _ = changed(false).await;
                    self.up = false;
                }
            }
        }
    }
}

/// Reads every managed link again and acts on it.
async fn resync(core: &Arc<Core>, links: &mut [Link]) {
    let running = running_links();
    for link in links {
        let seen = read_state(&link.name, &running);
        link.apply(core, seen).await;
    }
}

/// Watches the managed interfaces until `stop`.
pub async fn watch(
    core: Arc<Core>,
    names: Vec<String>,
    resync_every: Duration,
    stop: CancellationToken,
) {
    let events = match subscribe() {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot subscribe to link events; reading link state every second instead");
            None
        }
    };
    let running = running_links();
    let mut links: Vec<Link> = names
        .into_iter()
        .map(|name| {
            // At start every managed link was just attached to, so one that cannot be read now
            // counts as attached and up until a read says otherwise.
            let (attached, up) = match read_state(&name, &running) {
                LinkSeen::Present { index, up } => (Some(index), up),
                LinkSeen::Gone => (None, false),
                LinkSeen::Unreadable(_) => {
                    (nix::net::if_::if_nametoindex(name.as_str()).ok(), true)
                }
            };
            Link { name, attached, up }
        })
        .collect();
    // The read above came after the subscription: nothing can fall between the two.
    let Some(events) = events else {
        loop {
            tokio::select! {
                () = tokio::time::sleep(POLL) => resync(&core, &mut links).await,
                () = stop.cancelled() => return,
            }
        }
    };
    info!("following link events (rtnetlink)");
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let ready = tokio::select! {
            r = events.readable() => r,
            () = tokio::time::sleep(resync_every) => {
                resync(&core, &mut links).await;
                continue;
            }
            () = stop.cancelled() => return,
        };
        let Ok(mut guard) = ready else {
            resync(&core, &mut links).await;
            continue;
        };
        let got = guard.try_io(|fd| {
            recv(fd.get_ref().as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(io::Error::from)
        });
        match got {
            // Spurious readiness: wait again.
            Err(_would_block) => {}
            Ok(Ok(n)) => {
                for event in parse_events(&buf[..n]) {
                    for link in &mut links {
                        let seen = if event.name == link.name {
                            match event.up {
                                Some(up) => LinkSeen::Present {
                                    index: event.index,
                                    up,
                                },
                                None => LinkSeen::Gone,
                            }
                        } else if link.attached == Some(event.index) && event.up.is_some() {
                            // Renamed away: the managed name no longer names it.
                            LinkSeen::Gone
                        } else {
                            continue;
                        };
                        link.apply(&core, seen).await;
                    }
                }
            }
            Ok(Err(e)) => {
                // ENOBUFS: events were lost. Anything else: the socket cannot be read now.
                // Either way, read the state in full.
                LINK_READ_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(error = %e, "link events lost or unreadable; reading link state in full");
                resync(&core, &mut links).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `RTM_NEWLINK` / `RTM_DELLINK` datagram as the kernel sends it.
    fn message(kind: u16, index: u32, flags: u32, name: &str) -> Vec<u8> {
        let mut attr = Vec::new();
        let name = [name.as_bytes(), &[0]].concat();
        attr.extend_from_slice(&u16::try_from(4 + name.len()).expect("len").to_ne_bytes());
        attr.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        attr.extend_from_slice(&name);
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        let mut m = Vec::new();
        let len = 16 + 16 + attr.len();
        m.extend_from_slice(&u32::try_from(len).expect("len").to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[0, 0, 1, 0]);
        m.extend_from_slice(&index.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&attr);
        m
    }

    #[test]
    fn link_events_say_up_down_and_gone() {
        let mut datagram = message(RTM_NEWLINK, 7, IFF_UP | IFF_RUNNING | 0x1000, "edge-dev");
        datagram.extend(message(RTM_NEWLINK, 7, IFF_UP, "edge-dev"));
        datagram.extend(message(RTM_DELLINK, 8, 0, "edge-srv"));
        datagram.extend(message(24, 9, 0, "an-address-event"));
        assert_eq!(
            parse_events(&datagram),
            vec![
                LinkEvent {
                    index: 7,
                    name: "edge-dev".into(),
                    up: Some(true)
                },
                LinkEvent {
                    index: 7,
                    name: "edge-dev".into(),
                    up: Some(false)
                },
                LinkEvent {
                    index: 8,
                    name: "edge-srv".into(),
                    up: None
                },
            ]
        );
    }

    #[test]
    fn a_truncated_datagram_yields_what_is_whole() {
        let mut datagram = message(RTM_NEWLINK, 7, IFF_UP | IFF_RUNNING, "a");
        let whole = datagram.len();
        datagram.extend(message(RTM_NEWLINK, 8, 0, "b"));
        datagram.truncate(whole + 10);
        assert_eq!(parse_events(&datagram).len(), 1);
    }
}
