use std::{os::fd::AsFd as _, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{SchedClassifier, TcAttachType, tc},
};
use qod_common::{
    CLASSIFIER, COUNTERS_MAP, DeviceKey, DeviceRules, FAMILY_IPV4, FLOWS_V4_MAP, FLOWS_V6_MAP,
    FlowCounters, FlowRule, IFINDEX_MASK, MAX_SESSIONS_PER_DEVICE, POLICERS_MAP, PolicerState,
    SIDE_BOTH, SIDE_DOWNLINK, SIDE_UPLINK, SIDES_MAP,
};
use tracing::{info, warn};

use super::{DataPlane, DataPlaneError, scheduler::Scheduler};
use crate::config::{AttachMode, ManagedInterface, Side};

/// The classifier's code for an interface's side.
fn side_code(side: Side) -> u8 {
    match side {
        Side::Device => SIDE_DOWNLINK,
        Side::Server => SIDE_UPLINK,
        Side::Both => SIDE_BOTH,
    }
}

/// The classifier object built by `build.rs` (aya-build) from `qod-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/qod-ebpf"));

/// The real data plane: the qod classifier loaded into the kernel and its maps.
pub struct AyaDataPlane {
    /// Owns the program and its tc links; dropping it detaches the classifier.
    ebpf: Ebpf,
    flows_v4: HashMap<MapData, u32, DeviceRules>,
    flows_v6: HashMap<MapData, [u32; 2], DeviceRules>,
    counters: PerCpuArray<MapData, FlowCounters>,
    policers: Array<MapData, PolicerState>,
    sides: Array<MapData, u8>,
    capacity: u32,
    nr_cpus: usize,
    /// Managed interfaces and how the classifier was attached to each.
    interfaces: Vec<ManagedInterface>,
    attach_mode: AttachMode,
    /// The HTB trees qodd owns, by interface.
    schedulers: std::collections::HashMap<String, Scheduler>,
    restore_on_exit: bool,
}

impl AyaDataPlane {
    /// Loads the object with maps sized for `max_sessions` and runs the verifier on the classifier.
    /// Nothing is attached yet.
    pub fn load(max_sessions: u32) -> Result<Self, DataPlaneError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(FLOWS_V4_MAP, max_sessions)
            .map_max_entries(FLOWS_V6_MAP, max_sessions)
            .map_max_entries(COUNTERS_MAP, max_sessions)
            .map_max_entries(POLICERS_MAP, max_sessions)
            .load(EBPF_OBJECT)
            .map_err(|e| DataPlaneError::Load(Box::new(e)))?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(CLASSIFIER)
            .ok_or(DataPlaneError::Missing("classifier program"))?
            .try_into()
            .map_err(|e| program_error("is not a tc classifier", e))?;
        prog.load()
            .map_err(|e| program_error("was rejected by the kernel", e))?;
        let map = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(DataPlaneError::Missing(name))
        };
        let map_err = |map: &'static str| move |source| DataPlaneError::Map { map, source };
        let flows_v4 =
            HashMap::try_from(map(&mut ebpf, FLOWS_V4_MAP)?).map_err(map_err(FLOWS_V4_MAP))?;
        let flows_v6 =
            HashMap::try_from(map(&mut ebpf, FLOWS_V6_MAP)?).map_err(map_err(FLOWS_V6_MAP))?;
        let sides = Array::try_from(map(&mut ebpf, SIDES_MAP)?).map_err(map_err(SIDES_MAP))?;
        let counters = ebpf
            .take_map(COUNTERS_MAP)
            .ok_or(DataPlaneError::Missing(COUNTERS_MAP))?;
        let counters = PerCpuArray::try_from(counters).map_err(|source| DataPlaneError::Map {
            map: COUNTERS_MAP,
            source,
        })?;
        let policers = ebpf
            .take_map(POLICERS_MAP)
            .ok_or(DataPlaneError::Missing(POLICERS_MAP))?;
        let policers = Array::try_from(policers).map_err(|source| DataPlaneError::Map {
            map: POLICERS_MAP,
            source,
        })?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| DataPlaneError::Attach {
            interface: String::new(),
            what: format!("{what}: {e}"),
        })?;
        Ok(Self {
            ebpf,
            flows_v4,
            flows_v6,
            counters,
            policers,
            sides,
            capacity: max_sessions,
            nr_cpus,
            interfaces: Vec::new(),
            attach_mode: AttachMode::Auto,
            schedulers: std::collections::HashMap::new(),
            restore_on_exit: true,
        })
    }

    /// Attaches the classifier to every managed interface and installs the schedulers.
    pub fn manage(
        &mut self,
        interfaces: &[ManagedInterface],
        mode: AttachMode,
        restore_on_exit: bool,
    ) -> Result<(), DataPlaneError> {
        self.attach_mode = mode;
        self.restore_on_exit = restore_on_exit;
        self.interfaces = interfaces.to_vec();
        for i in interfaces {
            let how = self.attach(&i.name, i.side, mode)?;
            info!(interface = %i.name, mode = how, "classifier attached on egress");
            if let Some(config) = i.scheduler {
                self.schedulers
                    .insert(i.name.clone(), Scheduler::install(&i.name, config)?);
            }
        }
        Ok(())
    }

    fn scheduler(&self, interface: &str) -> Result<&Scheduler, DataPlaneError> {
        self.schedulers
            .get(interface)
            .ok_or_else(|| DataPlaneError::Scheduler {
                interface: interface.to_owned(),
                what: "qodd does not schedule this interface".into(),
            })
    }

    /// Attaches the classifier for `side` on `interface`'s egress; returns how ("tcx" or
    /// "clsact").
    pub fn attach(
        &mut self,
        interface: &str,
        side: Side,
        mode: AttachMode,
    ) -> Result<&'static str, DataPlaneError> {
        let index =
            nix::net::if_::if_nametoindex(interface).map_err(|e| DataPlaneError::Attach {
                interface: interface.to_owned(),
                what: format!("no such interface ({e})"),
            })?;
        self.set_side(index, side)?;
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(CLASSIFIER)
            .ok_or(DataPlaneError::Missing("classifier program"))?
            .try_into()
            .map_err(|e| program_error("is not a tc classifier", e))?;
        let attach_err = |e: &dyn std::fmt::Display| DataPlaneError::Attach {
            interface: interface.to_owned(),
            what: e.to_string(),
        };
        let tcx = |prog: &mut SchedClassifier| {
            prog.attach_with_options(
                interface,
                TcAttachType::Egress,
                tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
            )
        };
        let clsact = |prog: &mut SchedClassifier| -> Result<(), DataPlaneError> {
            // An existing clsact qdisc is fine: we add a filter to it.
            if let Err(e) = tc::qdisc_add_clsact(interface) {
                let exists = matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc_eexist()));
                if !exists {
                    return Err(attach_err(&e));
                }
            }
            prog.attach_with_options(
                interface,
                TcAttachType::Egress,
                tc::TcAttachOptions::Netlink(tc::NlOptions::default()),
            )
            .map_err(|e| attach_err(&e))?;
            Ok(())
        };
        match mode {
            AttachMode::Tcx => tcx(prog).map(|_| "tcx").map_err(|e| attach_err(&e)),
            AttachMode::Clsact => clsact(prog).map(|()| "clsact"),
            AttachMode::Auto => match tcx(prog) {
                Ok(_) => Ok("tcx"),
                Err(e) => {
                    warn!(interface, error = %e, "tcx attach failed; falling back to clsact");
                    clsact(prog).map(|()| "clsact")
                }
            },
        }
    }

    /// Tells the classifier which end of packets leaving interface `ifindex` can be a device.
    /// An interface whose index does not fit the map stays two-sided (correct, one look-up more).
    pub fn set_side(&mut self, ifindex: u32, side: Side) -> Result<(), DataPlaneError> {
        if ifindex > IFINDEX_MASK {
            warn!(
                ifindex,
                "interface index beyond the side map; looking both ways"
            );
            return Ok(());
        }
        self.sides
            .set(ifindex, side_code(side), 0)
            .map_err(|source| DataPlaneError::Map {
                map: SIDES_MAP,
                source,
            })
    }

    /// The loaded classifier, for `BPF_PROG_TEST_RUN`.
    pub fn program_fd(&self) -> Result<std::os::fd::BorrowedFd<'_>, DataPlaneError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(CLASSIFIER)
            .ok_or(DataPlaneError::Missing("classifier program"))?
            .try_into()
            .map_err(|e| program_error("is not a tc classifier", e))?;
        let fd = prog.fd().map_err(|e| program_error("has no fd", e))?;
        Ok(fd.as_fd())
    }
}

fn libc_eexist() -> i32 {
    nix::errno::Errno::EEXIST as i32
}

fn program_error(what: &str, e: aya::programs::ProgramError) -> DataPlaneError {
    DataPlaneError::Program {
        program: CLASSIFIER,
        what: what.to_owned(),
        source: Box::new(e),
    }
}

impl DataPlane for AyaDataPlane {
    fn install(&mut self, key: DeviceKey, rules: &[FlowRule]) -> Result<(), DataPlaneError> {
        let mut value = DeviceRules::default();
        for (slot, rule) in value.rules.iter_mut().zip(rules) {
            *slot = *rule;
        }
        value.n = rules.len().min(MAX_SESSIONS_PER_DEVICE) as u32;
        let (map, result) = if key.family == FAMILY_IPV4 {
            (FLOWS_V4_MAP, self.flows_v4.insert(key.addr[0], value, 0))
        } else {
            (
                FLOWS_V6_MAP,
                self.flows_v6.insert([key.addr[0], key.addr[1]], value, 0),
            )
        };
        result.map_err(|source| match &source {
            MapError::SyscallError(e)
                if e.io_error.raw_os_error() == Some(nix::errno::Errno::E2BIG as i32) =>
            {
                DataPlaneError::Full {
                    capacity: self.capacity,
                }
            }
            _ => DataPlaneError::Map { map, source },
        })
    }

    fn remove(&mut self, key: &DeviceKey) -> Result<(), DataPlaneError> {
        let (map, result) = if key.family == FAMILY_IPV4 {
            (FLOWS_V4_MAP, self.flows_v4.remove(&key.addr[0]))
        } else {
            (
                FLOWS_V6_MAP,
                self.flows_v6.remove(&[key.addr[0], key.addr[1]]),
            )
        };
        match result {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) =>
            {
                Ok(())
            }
            Err(source) => Err(DataPlaneError::Map { map, source }),
        }
    }

    fn counters(&self, slot: u32) -> Result<FlowCounters, DataPlaneError> {
        let per_cpu = self
            .counters
            .get(&slot, 0)
            .map_err(|source| DataPlaneError::Map {
                map: COUNTERS_MAP,
                source,
            })?;
        Ok(per_cpu
            .iter()
            .fold(FlowCounters::default(), |a, c| FlowCounters {
                up_packets: a.up_packets + c.up_packets,
                up_bytes: a.up_bytes + c.up_bytes,
                down_packets: a.down_packets + c.down_packets,
                down_bytes: a.down_bytes + c.down_bytes,
                up_dropped: a.up_dropped + c.up_dropped,
                down_dropped: a.down_dropped + c.down_dropped,
            }))
    }

    fn set_class(
        &mut self,
        interface: &str,
        index: u16,
        spec: super::scheduler::ClassSpec,
    ) -> Result<(), DataPlaneError> {
        self.scheduler(interface)?.set_class(index, spec)
    }

    fn remove_class(&mut self, interface: &str, index: u16) -> Result<(), DataPlaneError> {
        self.scheduler(interface)?.remove_class(index)
    }

    fn reattach(&mut self, interface: &str) -> Result<(), DataPlaneError> {
        let side = self
            .interfaces
            .iter()
            .find(|i| i.name == interface)
            .map_or(Side::Both, |i| i.side);
        let how = self.attach(interface, side, self.attach_mode)?;
        info!(interface, mode = how, "classifier attached again");
        let config = self
            .interfaces
            .iter()
            .find(|i| i.name == interface)
            .and_then(|i| i.scheduler);
        if let Some(config) = config {
            self.schedulers
                .insert(interface.to_owned(), Scheduler::install(interface, config)?);
        }
        Ok(())
    }

    fn shutdown(&mut self) {
        if self.restore_on_exit {
            for s in self.schedulers.values() {
                s.remove();
            }
        }
    }

    fn reset_counters(&mut self, slot: u32) -> Result<(), DataPlaneError> {
        self.policers
            .set(slot, PolicerState::default(), 0)
            .map_err(|source| DataPlaneError::Map {
                map: POLICERS_MAP,
                source,
            })?;
        let zeros =
            PerCpuValues::try_from(vec![FlowCounters::default(); self.nr_cpus]).map_err(|e| {
                DataPlaneError::Map {
                    map: COUNTERS_MAP,
                    source: MapError::from(e),
                }
            })?;
        self.counters
            .set(slot, zeros, 0)
            .map_err(|source| DataPlaneError::Map {
                map: COUNTERS_MAP,
                source,
            })
    }
}

/// Mounts bpffs at `path` unless one is already there.
pub fn ensure_bpffs(path: &Path) -> Result<(), DataPlaneError> {
    let err = |source| DataPlaneError::Bpffs {
        path: path.to_owned(),
        source,
    };
    if let Ok(fs) = nix::sys::statfs::statfs(path)
        && fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC
    {
        return Ok(());
    }
    std::fs::create_dir_all(path)
        .map_err(|e| err(nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(err)?;
    info!(path = %path.display(), "mounted bpffs");
    Ok(())
}
