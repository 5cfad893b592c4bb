use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, MapInfo, MapType, PerCpuArray, PerCpuValues},
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcHandle},
    },
};
use qod_common::{
    BAND_COUNTERS_ENTRIES, BAND_COUNTERS_MAP, BANDS, BandCounters, CLASSIFIER, COUNTERS_MAP,
    DeviceKey, DeviceRules, FAMILY_IPV4, FAMILY_IPV6, FLOWS_V4_MAP, FLOWS_V6_MAP,
    FRAGMENTS_ENTRIES, FRAGMENTS_MAP, FlowCounters, FlowRule, FragmentSlot, IFINDEX_MASK,
    INTERFACES_MAP, InterfaceInfo, LAYOUT_VERSION, MAX_INTERFACES, MAX_PROFILES,
    MAX_SESSIONS_PER_DEVICE, PARSE_COUNTERS_MAP, POLICERS_MAP, PROFILES_MAP, ParseCounters,
    PolicerState, ProfileTreatment, SIDE_BOTH, SIDE_DOWNLINK, SIDE_UPLINK, band_counter_index,
};
use tracing::{info, warn};

use super::{AttachMode, ManagedInterface, Side};
use super::{DataPlane, DataPlaneError, scheduler::Scheduler};

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

/// The floor probe (`qod-ebpf/src/bin/qod-floor.rs`), the least a session classifier does, for
/// the classifier benchmark to measure beside [`EBPF_OBJECT`]. qodd never loads it (and, never
/// referenced there, the linker leaves it out of the binary).
pub static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/qod-floor"));

/// The versioned directory under a pin root where one layout's maps and links live.
pub fn pin_dir(root: &Path) -> PathBuf {
    root.join(format!("v{LAYOUT_VERSION}"))
}

/// What a previous qodd left pinned under a pin root.
#[derive(Debug, PartialEq, Eq)]
pub enum Pinned {
    /// Nothing: a fresh data plane.
    Nothing,
    /// Maps of this layout and capacity: reused as they are (treatment never stopped).
    Compatible,
    /// Something this qodd must not reuse, and why.
    Incompatible(String),
}

/// The maps of this layout: name, type, key and value size, entries.
fn expected_maps(max_sessions: u32) -> [(&'static str, MapType, usize, usize, u32); 9] {
    use std::mem::size_of;
    [
        (
            FLOWS_V4_MAP,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<DeviceRules>(),
            max_sessions,
        ),
        (
            FLOWS_V6_MAP,
            MapType::Hash,
            size_of::<[u32; 2]>(),
            size_of::<DeviceRules>(),
            max_sessions,
        ),
        (
            COUNTERS_MAP,
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<FlowCounters>(),
            max_sessions,
        ),
        (
            POLICERS_MAP,
            MapType::Array,
            size_of::<u32>(),
            size_of::<PolicerState>(),
            max_sessions,
        ),
        (
            INTERFACES_MAP,
            MapType::Array,
            size_of::<u32>(),
            size_of::<InterfaceInfo>(),
            IFINDEX_MASK + 1,
        ),
        (
            BAND_COUNTERS_MAP,
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<BandCounters>(),
            BAND_COUNTERS_ENTRIES,
        ),
        (
            FRAGMENTS_MAP,
            MapType::Array,
            size_of::<u32>(),
            size_of::<FragmentSlot>(),
            FRAGMENTS_ENTRIES,
        ),
        (
            PARSE_COUNTERS_MAP,
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<ParseCounters>(),
            MAX_INTERFACES + 1,
        ),
        (
            PROFILES_MAP,
            MapType::Array,
            size_of::<u32>(),
            size_of::<ProfileTreatment>(),
            MAX_PROFILES,
        ),
    ]
}

/// Checks what is pinned under `root` against this layout (version, map types, key and value
/// sizes, capacities).
pub fn inspect_pins(root: &Path, max_sessions: u32) -> Pinned {
    let current = pin_dir(root);
    if let Some(other) = layout_dirs(root).into_iter().find(|d| *d != current) {
        return Pinned::Incompatible(format!(
            "{} is pinned by another layout (this qodd uses layout v{LAYOUT_VERSION})",
            other.display()
        ));
    }
    let expected = expected_maps(max_sessions);
    let mut found = 0;
    for (name, kind, key, value, entries) in expected {
        let path = current.join(name);
        if !path.exists() {
            continue;
        }
        found += 1;
        let info = match MapInfo::from_pin(&path) {
            Ok(i) => i,
            Err(e) => {
                return Pinned::Incompatible(format!("{} cannot be read: {e}", path.display()));
            }
        };
        let seen = (
            info.map_type().ok(),
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if seen != (Some(kind), key, value, entries) {
            return Pinned::Incompatible(format!(
                "pinned map {name} is {seen:?} (type, key, value, entries); this qodd needs {:?}",
                (kind, key, value, entries)
            ));
        }
    }
    match found {
        0 => Pinned::Nothing,
        n if n == expected.len() => Pinned::Compatible,
        n => Pinned::Incompatible(format!(
            "only {n} of the {} maps are pinned",
            expected.len()
        )),
    }
}

/// qod's layout directories (`v<N>`) under a pin root; anything else there is not qod's.
fn layout_dirs(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix('v'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect()
}

/// Removes every qod layout pinned under `root` (and `root` if nothing else is left there): the
/// links go (the classifier detaches), and the maps with them.
pub fn remove_pins(root: &Path) -> Result<(), DataPlaneError> {
    for dir in layout_dirs(root) {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DataPlaneError::PinDir { path: dir, source }),
        }
    }
    let _ = std::fs::remove_dir(root);
    Ok(())
}

/// The tc priority and handle of qod's filter on a clsact egress (fixed, so a restart replaces
/// its own filter instead of adding a second).
const NL_PRIORITY: u16 = 0x0d0d;
const NL_HANDLE: TcHandle = TcHandle::new(0, 0x0d0d);

/// Removes qod's clsact filter from `interface`'s egress, if there is one.
fn detach_clsact(interface: &str) {
    if let Ok(link) = SchedClassifierLink::attached(
        interface,
        TcAttachType::Egress,
        NL_PRIORITY,
        NL_HANDLE,
        None,
    ) {
        let _ = aya::programs::links::Link::detach(link);
    }
}

/// The rules an entry holds (its first `n`).
fn held_rules(v: &DeviceRules) -> &[FlowRule] {
    &v.rules[..(v.n as usize).min(MAX_SESSIONS_PER_DEVICE)]
}

/// The device key of an IPv4 flow map key.
fn v4_key(k: u32) -> DeviceKey {
    DeviceKey {
        family: FAMILY_IPV4,
        addr: [k, 0, 0, 0],
    }
}

/// The device key of an IPv6 flow map key (the /64).
fn v6_key(k: [u32; 2]) -> DeviceKey {
    DeviceKey {
        family: FAMILY_IPV6,
        addr: [k[0], k[1], 0, 0],
    }
}

/// The classifier program. The verifier (most of a start's fixed cost) runs on a thread of its
/// own while the start goes on; the program is needed only to attach it.
enum Classifier {
    Verifying(std::thread::JoinHandle<Result<SchedClassifier, DataPlaneError>>),
    Ready(Box<SchedClassifier>),
    /// Taken while joining the verifier.
    Gone,
}

/// The pin name of this build's classifier: `classifier-` and a hash of the object, so a pinned
/// program is taken up again only by a qodd that would load the very same code.
fn classifier_pin(pins: &Path) -> PathBuf {
    // FNV-1a: stable across builds of qodd, unlike std's hasher.
    let hash = EBPF_OBJECT.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    pins.join(format!("{CLASSIFIER_PIN_PREFIX}{hash:016x}"))
}

const CLASSIFIER_PIN_PREFIX: &str = "classifier-";

/// The pinned classifier of this build, if a previous qodd left it over these very maps (every
/// map it uses is one of `pins`' maps): the kernel holds it verified already.
fn pinned_classifier(pins: &Path) -> Option<SchedClassifier> {
    let prog = SchedClassifier::from_pin(classifier_pin(pins)).ok()?;
    let uses = prog.info().ok()?.map_ids().ok()??;
    let ours: Vec<u32> = expected_maps(0)
        .iter()
        .map(|(name, ..)| MapInfo::from_pin(pins.join(name)).map(|i| i.id()))
        .collect::<Result<_, _>>()
        .ok()?;
    uses.iter().all(|id| ours.contains(id)).then_some(prog)
}

/// Runs the verifier on the object's classifier and pins it as this build's (see
/// [`classifier_pin`]), letting go of any other build's pinned program (links hold their own).
fn verify_classifier(mut ebpf: Ebpf, pins: &Path) -> Result<SchedClassifier, DataPlaneError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(CLASSIFIER)
        .ok_or(DataPlaneError::Missing("classifier program"))?
        .try_into()
        .map_err(|e| program_error("is not a tc classifier", e))?;
    prog.load()
        .map_err(|e| program_error("was rejected by the kernel", e))?;
    let pin = classifier_pin(pins);
    for old in std::fs::read_dir(pins).into_iter().flatten().flatten() {
        if old
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(CLASSIFIER_PIN_PREFIX))
        {
            let _ = std::fs::remove_file(old.path());
        }
    }
    prog.pin(&pin).map_err(|e| DataPlaneError::Pins {
        path: pin.clone(),
        what: e.to_string(),
    })?;
    SchedClassifier::from_pin(&pin).map_err(|e| program_error("cannot be opened from its pin", e))
}

/// The real data plane: the qod classifier loaded into the kernel and its maps.
pub struct AyaDataPlane {
    /// The program; its tc links are pinned (tcx) or left to the kernel (clsact).
    classifier: Classifier,
    flows_v4: HashMap<MapData, u32, DeviceRules>,
    flows_v6: HashMap<MapData, [u32; 2], DeviceRules>,
    counters: PerCpuArray<MapData, FlowCounters>,
    /// A second handle on the counters map (its pin opened again), for readers.
    counters_reader: Arc<CountersMap>,
    /// Second handles on the flow maps, for listing their keys from any thread.
    flow_keys: Arc<FlowKeys>,
    policers: Array<MapData, PolicerState>,
    profiles: Array<MapData, ProfileTreatment>,
    interface_info: Array<MapData, InterfaceInfo>,
    band_counters: PerCpuArray<MapData, BandCounters>,
    parse_counters: PerCpuArray<MapData, ParseCounters>,
    capacity: u32,
    nr_cpus: usize,
    /// Managed interfaces and how the classifier was attached to each.
    interfaces: Vec<ManagedInterface>,
    attach_mode: AttachMode,
    /// The HTB trees qodd owns, by interface (shared with the core's class operations).
    schedulers: Arc<SchedulerSet>,
    /// Tear everything down on a graceful stop (else the data plane stays, pinned).
    teardown_on_exit: bool,
    /// Where maps and links are pinned (versioned).
    pins: PathBuf,
    /// Between [`DataPlane::begin_bulk`] and [`DataPlane::end_bulk`]: the writing thread.
    bulk: Option<Bulk>,
    /// A private pin root removed on drop (tests and benchmarks).
    ephemeral: Option<PathBuf>,
    /// The pinned maps were there before: their entries and counters carry on.
    reused: bool,
    /// This build's classifier was pinned over those maps: taken up without the verifier.
    classifier_reused: bool,
}

impl Drop for AyaDataPlane {
    fn drop(&mut self) {
        // The verifier's program refers to this value's maps by their descriptors, and pins
        // into its directory: it finishes before either goes.
        if let Classifier::Verifying(verifier) =
            std::mem::replace(&mut self.classifier, Classifier::Gone)
        {
            let _ = verifier.join();
        }
        if let Some(root) = &self.ephemeral {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

impl AyaDataPlane {
    /// The parse counters of interface counter slot `slot` (0: packets on interfaces without
    /// one), summed over CPUs.
    pub fn parse_counters_at(&self, slot: u32) -> Result<ParseCounters, DataPlaneError> {
        let per_cpu = self
            .parse_counters
            .get(&slot, 0)
            .map_err(|source| DataPlaneError::Map {
                map: PARSE_COUNTERS_MAP,
                source,
            })?;
        let mut sum = ParseCounters::default();
        for c in per_cpu.iter() {
            sum.ipv6_chain_too_long += c.ipv6_chain_too_long;
            sum.fragments_remembered += c.fragments_remembered;
            sum.fragments_followed += c.fragments_followed;
            sum.fragments_unknown += c.fragments_unknown;
        }
        Ok(sum)
    }

    /// Profile entry `index` as the kernel holds it.
    fn profile_at(&self, index: u16) -> Result<ProfileTreatment, DataPlaneError> {
        self.profiles
            .get(&u32::from(index), 0)
            .map_err(|source| DataPlaneError::Map {
                map: PROFILES_MAP,
                source,
            })
    }

    /// Loads the object with maps sized for `max_sessions`; the classifier is verified on a
    /// thread of its own meanwhile (or, continuing over pinned maps, this build's pinned program
    /// is taken as it is). Nothing is attached yet. Maps are pinned under `pin_dir(pin_root)`;
    /// ones already there are reused as they are (check them first with [`inspect_pins`]).
    pub fn load(max_sessions: u32, pin_root: &Path) -> Result<Self, DataPlaneError> {
        let pins = pin_dir(pin_root);
        std::fs::create_dir_all(&pins).map_err(|source| DataPlaneError::PinDir {
            path: pins.clone(),
            source,
        })?;
        let reused = pins.join(FLOWS_V4_MAP).exists();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pins)
            .map_max_entries(FLOWS_V4_MAP, max_sessions)
            .map_max_entries(FLOWS_V6_MAP, max_sessions)
            .map_max_entries(COUNTERS_MAP, max_sessions)
            .map_max_entries(POLICERS_MAP, max_sessions)
            .load(EBPF_OBJECT)
            .map_err(|e| DataPlaneError::Load(Box::new(e)))?;
        let map = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(DataPlaneError::Missing(name))
        };
        let map_err = |map: &'static str| move |source| DataPlaneError::Map { map, source };
        let flows_v4 =
            HashMap::try_from(map(&mut ebpf, FLOWS_V4_MAP)?).map_err(map_err(FLOWS_V4_MAP))?;
        let flows_v6 =
            HashMap::try_from(map(&mut ebpf, FLOWS_V6_MAP)?).map_err(map_err(FLOWS_V6_MAP))?;
        let interface_info =
            Array::try_from(map(&mut ebpf, INTERFACES_MAP)?).map_err(map_err(INTERFACES_MAP))?;
        let band_counters = PerCpuArray::try_from(map(&mut ebpf, BAND_COUNTERS_MAP)?)
            .map_err(map_err(BAND_COUNTERS_MAP))?;
        let parse_counters = PerCpuArray::try_from(map(&mut ebpf, PARSE_COUNTERS_MAP)?)
            .map_err(map_err(PARSE_COUNTERS_MAP))?;
        let counters =
            PerCpuArray::try_from(map(&mut ebpf, COUNTERS_MAP)?).map_err(map_err(COUNTERS_MAP))?;
        let counters_reader = aya::maps::MapData::from_pin(pins.join(COUNTERS_MAP))
            .and_then(aya::maps::Map::from_map_data)
            .and_then(PerCpuArray::try_from)
            .map_err(map_err(COUNTERS_MAP))?;
        let policers =
            Array::try_from(map(&mut ebpf, POLICERS_MAP)?).map_err(map_err(POLICERS_MAP))?;
        let profiles =
            Array::try_from(map(&mut ebpf, PROFILES_MAP)?).map_err(map_err(PROFILES_MAP))?;
        let flow_keys = Arc::new(FlowKeys::open(&pins)?);
        let nr_cpus =
            aya::util::nr_cpus().map_err(|(what, source)| DataPlaneError::Cpus { what, source })?;
        let pinned = reused.then(|| pinned_classifier(&pins)).flatten();
        let classifier_reused = pinned.is_some();
        let classifier = match pinned {
            Some(prog) => {
                info!("classifier of this build found pinned over these maps; taken as it is");
                Classifier::Ready(Box::new(prog))
            }
            None => {
                let at = pins.clone();
                Classifier::Verifying(
                    std::thread::Builder::new()
                        .name("qodd-verifier".into())
                        .spawn(move || verify_classifier(ebpf, &at))
                        .map_err(DataPlaneError::Thread)?,
                )
            }
        };
        Ok(Self {
            classifier,
            flows_v4,
            flows_v6,
            counters,
            counters_reader: Arc::new(CountersMap(counters_reader)),
            flow_keys,
            policers,
            profiles,
            interface_info,
            band_counters,
            parse_counters,
            capacity: max_sessions,
            nr_cpus,
            interfaces: Vec::new(),
            attach_mode: AttachMode::Auto,
            schedulers: Arc::default(),
            teardown_on_exit: false,
            pins,
            bulk: None,
            ephemeral: None,
            reused,
            classifier_reused,
        })
    }

    /// As [`AyaDataPlane::load`] under a private pin root that is removed on drop, for tests and
    /// benchmarks: nothing outlives the value.
    pub fn load_ephemeral(max_sessions: u32) -> Result<Self, DataPlaneError> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let bpffs = Path::new("/sys/fs/bpf");
        ensure_bpffs(bpffs)?;
        let root = bpffs.join(format!(
            "qod-ephemeral-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // A load the verifier refuses leaves no pins behind either.
        let mut dp = Self::load(max_sessions, &root).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&root);
        })?;
        dp.ephemeral = Some(root);
        dp.classifier()?;
        Ok(dp)
    }

    /// Where the classifier's tcx link on `interface` is pinned.
    fn link_pin(&self, interface: &str) -> PathBuf {
        self.pins.join(format!("link-egress-{interface}"))
    }

    /// Whether the maps were pinned before this qodd: entries and counters carried on.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Whether this build's classifier was found pinned over the reused maps and taken up as
    /// it is (no verifier run).
    pub fn classifier_reused(&self) -> bool {
        self.classifier_reused
    }

    /// Takes charge of the managed interfaces: tells the classifier their sides and installs
    /// the schedulers. The classifier is attached by [`DataPlane::attach_managed`], once the
    /// sessions are installed (continuing, the pinned links keep the last program meanwhile).
    pub fn manage(
        &mut self,
        interfaces: &[ManagedInterface],
        mode: AttachMode,
        teardown_on_exit: bool,
    ) -> Result<(), DataPlaneError> {
        self.attach_mode = mode;
        self.teardown_on_exit = teardown_on_exit;
        self.interfaces = interfaces.to_vec();
        for i in interfaces {
            self.describe(&i.name, i.side)?;
            if let Some(config) = i.scheduler {
                self.schedulers
                    .write()
                    .insert(i.name.clone(), Scheduler::install(&i.name, config)?);
            }
        }
        Ok(())
    }

    /// Tells the classifier which side `interface` is and which counter slot counts it.
    fn describe(&mut self, interface: &str, side: Side) -> Result<(), DataPlaneError> {
        let index = nix::net::if_::if_nametoindex(interface).map_err(|source| {
            DataPlaneError::NoInterface {
                interface: interface.to_owned(),
                source,
            }
        })?;
        // Counter slots follow the configured order (1-based); an interface attached outside
        // `manage` shares slot 0.
        let counters = self
            .interfaces
            .iter()
            .position(|i| i.name == interface)
            .map_or(0, |p| p + 1);
        self.set_interface(index, side, u8::try_from(counters).unwrap_or(0))
    }

    /// Attaches the classifier for `side` on `interface`'s egress; returns how ("tcx" or
    /// "clsact").
    pub fn attach(
        &mut self,
        interface: &str,
        side: Side,
        mode: AttachMode,
    ) -> Result<&'static str, DataPlaneError> {
        self.describe(interface, side)?;
        let link_pin = self.link_pin(interface);
        let prog = self.classifier()?;
        let attach_err = |e: &dyn std::fmt::Display| DataPlaneError::Attach {
            interface: interface.to_owned(),
            what: e.to_string(),
        };
        // tcx: the link is pinned, so the classifier stays attached while qodd is down; a pinned
        // link from a previous run gets this program atomically (no packet goes untreated).
        let tcx = |prog: &mut SchedClassifier| -> Result<(), DataPlaneError> {
            if link_pin.exists() {
                let replaced = PinnedLink::from_pin(&link_pin)
                    .map_err(|e| attach_err(&e))
                    .map(FdLink::from)
                    .and_then(|l| SchedClassifierLink::try_from(l).map_err(|e| attach_err(&e)))
                    .and_then(|l| prog.attach_to_link(l).map_err(|e| attach_err(&e)));
                match replaced {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        // A link left by an interface that went away: start afresh.
                        warn!(interface, error = %e, "pinned classifier link unusable; attaching anew");
                        let _ = std::fs::remove_file(&link_pin);
                    }
                }
            }
            let id = prog
                .attach_with_options(
                    interface,
                    TcAttachType::Egress,
                    tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
                )
                .map_err(|e| attach_err(&e))?;
            let link = prog.take_link(id).map_err(|e| attach_err(&e))?;
            let link = FdLink::try_from(link).map_err(|e| attach_err(&e))?;
            link.pin(&link_pin).map_err(|e| attach_err(&e))?;
            Ok(())
        };
        // clsact: a tc filter outlives its loader anyway; a fixed priority and handle make a
        // restart replace qod's filter in place.
        let clsact = |prog: &mut SchedClassifier| -> Result<(), DataPlaneError> {
            // An existing clsact qdisc is fine: we add a filter to it.
            if let Err(e) = tc::qdisc_add_clsact(interface) {
                let exists = matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc_eexist()));
                if !exists {
                    return Err(attach_err(&e));
                }
            }
            let options = NlOptions {
                priority: NL_PRIORITY,
                handle: NL_HANDLE,
                ..NlOptions::default()
            };
            let id = match prog.attach_with_options(
                interface,
                TcAttachType::Egress,
                tc::TcAttachOptions::Netlink(options),
            ) {
                Ok(id) => id,
                Err(_) => {
                    let existing = SchedClassifierLink::attached(
                        interface,
                        TcAttachType::Egress,
                        NL_PRIORITY,
                        NL_HANDLE,
                        None,
                    )
                    .map_err(|e| attach_err(&e))?;
                    prog.attach_to_link(existing).map_err(|e| attach_err(&e))?
                }
            };
            // Owned by nobody: dropping the link would remove the filter.
            std::mem::forget(prog.take_link(id).map_err(|e| attach_err(&e))?);
            Ok(())
        };
        let how = match mode {
            AttachMode::Tcx => tcx(prog).map(|()| "tcx"),
            AttachMode::Clsact => clsact(prog).map(|()| "clsact"),
            AttachMode::Auto => match tcx(prog) {
                Ok(()) => Ok("tcx"),
                Err(e) => {
                    warn!(interface, error = %e, "tcx attach failed; falling back to clsact");
                    clsact(prog).map(|()| "clsact")
                }
            },
        }?;
        // An attachment of the other kind left by an earlier run would run the classifier twice.
        if how == "tcx" {
            detach_clsact(interface);
        } else {
            let _ = std::fs::remove_file(&link_pin);
        }
        Ok(how)
    }

    /// Detaches the classifier from every managed interface and removes the pinned maps.
    fn teardown(&mut self) {
        // Removing the pins (below) detaches the tcx links.
        for i in &self.interfaces {
            detach_clsact(&i.name);
        }
        if let Some(root) = self.pins.parent()
            && let Err(e) = remove_pins(root)
        {
            warn!(error = %e, "cannot remove the pinned maps");
        }
    }

    /// Tells the classifier which end of packets leaving interface `ifindex` can be a device,
    /// and which counter slot (1..=`MAX_INTERFACES`, 0 shared) counts them. A slot that counted
    /// another interface before (the configured order changed across a restart) starts from
    /// zero. An interface whose index does not fit the map stays two-sided (correct, one
    /// look-up more) and counts in slot 0.
    pub fn set_interface(
        &mut self,
        ifindex: u32,
        side: Side,
        counters: u8,
    ) -> Result<(), DataPlaneError> {
        if ifindex > IFINDEX_MASK {
            warn!(
                ifindex,
                "interface index beyond the interface map; looking both ways"
            );
            return Ok(());
        }
        let counters = if u32::from(counters) > MAX_INTERFACES {
            0
        } else {
            counters
        };
        let map_err = |map| move |source| DataPlaneError::Map { map, source };
        let before = self
            .interface_info
            .get(&ifindex, 0)
            .map_err(map_err(INTERFACES_MAP))?;
        if before.counters != counters && counters != 0 {
            for band in 0..BANDS as u8 {
                let zeros = PerCpuValues::try_from(vec![BandCounters::default(); self.nr_cpus])
                    .map_err(|e| DataPlaneError::Map {
                        map: BAND_COUNTERS_MAP,
                        source: MapError::from(e),
                    })?;
                self.band_counters
                    .set(band_counter_index(counters, band), zeros, 0)
                    .map_err(map_err(BAND_COUNTERS_MAP))?;
            }
        }
        let info = InterfaceInfo {
            side: side_code(side),
            counters,
            _pad: [0; 2],
        };
        self.interface_info
            .set(ifindex, info, 0)
            .map_err(map_err(INTERFACES_MAP))
    }

    /// As [`AyaDataPlane::set_interface`] with the shared counter slot.
    pub fn set_side(&mut self, ifindex: u32, side: Side) -> Result<(), DataPlaneError> {
        self.set_interface(ifindex, side, 0)
    }

    /// The devices the kernel holds rules for and the slots they count into, read a batch of
    /// entries per system call (`BPF_MAP_LOOKUP_BATCH`); an error where the kernel does not do
    /// batches.
    pub fn device_entries_batched(&self) -> Result<super::KernelEntries, DataPlaneError> {
        self.flow_keys.batched()
    }

    /// The verified classifier (waiting for the verifier if it still runs).
    fn classifier(&mut self) -> Result<&mut SchedClassifier, DataPlaneError> {
        if let Classifier::Verifying(_) = self.classifier {
            let Classifier::Verifying(verifier) =
                std::mem::replace(&mut self.classifier, Classifier::Gone)
            else {
                unreachable!("matched above")
            };
            let verified = verifier
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            self.classifier = Classifier::Ready(Box::new(verified));
        }
        match &mut self.classifier {
            Classifier::Ready(prog) => Ok(prog),
            _ => Err(DataPlaneError::Missing(
                "classifier program (its verification failed)",
            )),
        }
    }

    /// The loaded classifier, for `BPF_PROG_TEST_RUN` (an ephemeral data plane's, or once
    /// attached: before, the verifier may still run).
    pub fn program_fd(&self) -> Result<std::os::fd::BorrowedFd<'_>, DataPlaneError> {
        let Classifier::Ready(prog) = &self.classifier else {
            return Err(DataPlaneError::Missing(
                "classifier program (not verified yet)",
            ));
        };
        let fd = prog.fd().map_err(|e| program_error("has no fd", e))?;
        Ok(fd.as_fd())
    }
}

/// The HTB trees qodd owns, by interface: the data plane installs them (again, when a link is
/// re-created); the core's class operations run on them from any thread.
#[derive(Debug, Default)]
pub struct SchedulerSet(std::sync::RwLock<std::collections::HashMap<String, Scheduler>>);

impl SchedulerSet {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, std::collections::HashMap<String, Scheduler>> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, std::collections::HashMap<String, Scheduler>> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    /// `f` on `interface`'s scheduler.
    fn with<T>(
        &self,
        interface: &str,
        f: impl FnOnce(&Scheduler) -> Result<T, DataPlaneError>,
    ) -> Result<T, DataPlaneError> {
        let schedulers = self.read();
        let s = schedulers
            .get(interface)
            .ok_or_else(|| DataPlaneError::Scheduler {
                interface: interface.to_owned(),
                what: "qodd does not schedule this interface".into(),
            })?;
        f(s)
    }
}

impl super::Classes for SchedulerSet {
    fn set_class(
        &self,
        interface: &str,
        index: u16,
        spec: super::scheduler::ClassSpec,
    ) -> Result<super::TcStats, DataPlaneError> {
        self.with(interface, |s| s.set_class(index, spec))
    }

    fn park_class(&self, interface: &str, index: u16) -> Result<(), DataPlaneError> {
        self.with(interface, |s| s.park_class(index))
    }

    fn class_stats(&self, interface: &str, index: u16) -> Result<super::TcStats, DataPlaneError> {
        self.with(interface, |s| s.class_stats(index))
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
        if let Some(bulk) = &mut self.bulk {
            bulk.hand_over(key, Some(value));
            return Ok(());
        }
        write_entry(
            &mut self.flows_v4,
            &mut self.flows_v6,
            self.capacity,
            key,
            Some(value),
        )
    }

    fn begin_bulk(&mut self) -> Result<(), DataPlaneError> {
        if self.bulk.is_none() {
            self.bulk = Some(Bulk::start(&self.pins, self.capacity)?);
        }
        Ok(())
    }

    fn end_bulk(&mut self) -> Vec<(DeviceKey, DataPlaneError)> {
        self.bulk.take().map(Bulk::end).unwrap_or_default()
    }

    fn rules(&self, key: &DeviceKey) -> Result<Vec<FlowRule>, DataPlaneError> {
        if let Some(value) = self.bulk.as_ref().and_then(|b| b.unwritten(key)) {
            return Ok(value
                .as_ref()
                .map(|v| held_rules(v).to_vec())
                .unwrap_or_default());
        }
        let (map, found) = if key.family == FAMILY_IPV4 {
            (FLOWS_V4_MAP, self.flows_v4.get(&key.addr[0], 0))
        } else {
            (
                FLOWS_V6_MAP,
                self.flows_v6.get(&[key.addr[0], key.addr[1]], 0),
            )
        };
        match found {
            Ok(v) => Ok(held_rules(&v).to_vec()),
            Err(MapError::KeyNotFound) => Ok(Vec::new()),
            Err(source) => Err(DataPlaneError::Map { map, source }),
        }
    }

    fn remove(&mut self, key: &DeviceKey) -> Result<(), DataPlaneError> {
        if let Some(bulk) = &mut self.bulk {
            bulk.hand_over(*key, None);
            return Ok(());
        }
        write_entry(
            &mut self.flows_v4,
            &mut self.flows_v6,
            self.capacity,
            *key,
            None,
        )
    }

    fn counters(&self, slot: u32) -> Result<FlowCounters, DataPlaneError> {
        sum_counters(&self.counters, slot)
    }

    fn counters_reader(&self) -> Arc<dyn super::CountersReader> {
        self.counters_reader.clone()
    }

    fn classes(&self) -> Arc<dyn super::Classes> {
        self.schedulers.clone()
    }

    fn session_classes(&self, interface: &str) -> Result<Vec<u16>, DataPlaneError> {
        self.schedulers.with(interface, Scheduler::session_classes)
    }

    fn queue_stats(&self) -> Result<Vec<(String, super::QueueStats)>, DataPlaneError> {
        let schedulers = self.schedulers.read();
        self.interfaces
            .iter()
            .filter_map(|i| schedulers.get(&i.name))
            .map(|s| Ok((s.interface.clone(), s.queue_stats()?)))
            .collect()
    }

    fn attach_managed(&mut self) -> Result<(), DataPlaneError> {
        // A classifier the kernel refused fails the start even with nothing to attach it to.
        self.classifier()?;
        for i in self.interfaces.clone() {
            let how = self.attach(&i.name, i.side, self.attach_mode)?;
            info!(interface = %i.name, mode = how, "classifier attached on egress");
        }
        Ok(())
    }

    fn reattach(&mut self, interface: &str) -> Result<(), DataPlaneError> {
        let (side, scheduler) = self
            .interfaces
            .iter()
            .find(|i| i.name == interface)
            .map_or((Side::Both, None), |i| (i.side, i.scheduler));
        // The old link went with the old interface.
        let _ = std::fs::remove_file(self.link_pin(interface));
        let how = self.attach(interface, side, self.attach_mode)?;
        info!(interface, mode = how, "classifier attached again");
        if let Some(config) = scheduler {
            let installed = Scheduler::install(interface, config)?;
            self.schedulers
                .write()
                .insert(interface.to_owned(), installed);
        }
        Ok(())
    }

    fn shutdown(&mut self) {
        if self.teardown_on_exit {
            for s in self.schedulers.read().values() {
                s.remove();
            }
            self.teardown();
            info!("data plane torn down");
        } else {
            info!(pins = %self.pins.display(), "data plane left in place (pinned)");
        }
    }

    fn entries(&self) -> Result<Vec<(DeviceKey, Vec<FlowRule>)>, DataPlaneError> {
        let map_err = |map| move |source| DataPlaneError::Map { map, source };
        let mut out = Vec::new();
        for e in self.flows_v4.iter() {
            let (k, v) = e.map_err(map_err(FLOWS_V4_MAP))?;
            out.push((v4_key(k), held_rules(&v).to_vec()));
        }
        for e in self.flows_v6.iter() {
            let (k, v) = e.map_err(map_err(FLOWS_V6_MAP))?;
            out.push((v6_key(k), held_rules(&v).to_vec()));
        }
        Ok(out)
    }

    fn device_lister(&self) -> Arc<dyn super::DeviceLister> {
        self.flow_keys.clone()
    }

    fn parse_counters(&self) -> Result<Vec<(String, ParseCounters)>, DataPlaneError> {
        let mut out = Vec::with_capacity(self.interfaces.len());
        for (n, i) in self.interfaces.iter().enumerate() {
            let Ok(slot) = u32::try_from(n + 1) else {
                break;
            };
            out.push((i.name.clone(), self.parse_counters_at(slot)?));
        }
        Ok(out)
    }

    fn band_counters(
        &self,
    ) -> Result<Vec<(String, [BandCounters; BANDS as usize])>, DataPlaneError> {
        let mut out = Vec::with_capacity(self.interfaces.len());
        for (n, i) in self.interfaces.iter().enumerate() {
            let Ok(slot) = u8::try_from(n + 1) else { break };
            let mut bands = [BandCounters::default(); BANDS as usize];
            for (band, sum) in bands.iter_mut().enumerate() {
                let per_cpu = self
                    .band_counters
                    .get(&band_counter_index(slot, band as u8), 0)
                    .map_err(|source| DataPlaneError::Map {
                        map: BAND_COUNTERS_MAP,
                        source,
                    })?;
                for c in per_cpu.iter() {
                    sum.packets += c.packets;
                    sum.bytes += c.bytes;
                    sum.policer_dropped_packets += c.policer_dropped_packets;
                    sum.policer_dropped_bytes += c.policer_dropped_bytes;
                }
            }
            out.push((i.name.clone(), bands));
        }
        Ok(out)
    }

    fn set_profile(&mut self, index: u16, t: &ProfileTreatment) -> Result<(), DataPlaneError> {
        self.profiles
            .set(u32::from(index), *t, 0)
            .map_err(|source| DataPlaneError::Map {
                map: PROFILES_MAP,
                source,
            })
    }

    fn profiles(&self) -> Result<Vec<(u16, ProfileTreatment)>, DataPlaneError> {
        let mut out = Vec::new();
        for index in 0..MAX_PROFILES as u16 {
            let t = self.profile_at(index)?;
            if t.in_use != 0 {
                out.push((index, t));
            }
        }
        Ok(out)
    }

    fn take_profile_out_of_use(&mut self, index: u16) -> Result<(), DataPlaneError> {
        let t = self.profile_at(index)?;
        if t.in_use == 0 {
            return Ok(());
        }
        self.set_profile(index, &ProfileTreatment { in_use: 0, ..t })
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

/// Writes device `key`'s entry (`None`: removes it; a missing entry is not an error).
fn write_entry(
    v4: &mut HashMap<MapData, u32, DeviceRules>,
    v6: &mut HashMap<MapData, [u32; 2], DeviceRules>,
    capacity: u32,
    key: DeviceKey,
    value: Option<DeviceRules>,
) -> Result<(), DataPlaneError> {
    let ipv4 = key.family == FAMILY_IPV4;
    let map = if ipv4 { FLOWS_V4_MAP } else { FLOWS_V6_MAP };
    let result = match (value, ipv4) {
        (Some(v), true) => v4.insert(key.addr[0], v, 0),
        (Some(v), false) => v6.insert([key.addr[0], key.addr[1]], v, 0),
        (None, true) => v4.remove(&key.addr[0]),
        (None, false) => v6.remove(&[key.addr[0], key.addr[1]]),
    };
    let errno = |e: &MapError| match e {
        MapError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    };
    match result {
        Ok(()) => Ok(()),
        Err(MapError::KeyNotFound) if value.is_none() => Ok(()),
        Err(e) if value.is_none() && errno(&e) == Some(nix::errno::Errno::ENOENT as i32) => Ok(()),
        Err(e) if errno(&e) == Some(nix::errno::Errno::E2BIG as i32) => {
            Err(DataPlaneError::Full { capacity })
        }
        Err(source) => Err(DataPlaneError::Map { map, source }),
    }
}

/// Entries handed over at most per message to the bulk writer.
const BULK_BATCH: usize = 1024;

/// One entry handed to the bulk writer: its place in the order, the device, the entry (`None`:
/// removed).
type BulkEntry = (u64, DeviceKey, Option<DeviceRules>);

/// The entries handed to the bulk writer and not written yet: the last of each device, with its
/// place in the order.
type Unwritten =
    Arc<parking_lot::Mutex<std::collections::HashMap<DeviceKey, (u64, Option<DeviceRules>)>>>;

/// Device entries written by a thread of their own (see [`DataPlane::begin_bulk`]). The kernel's
/// hash insert is most of a rebuilt session's cost (an element allocated and written per
/// device), so a restore after a reboot goes on admitting while the other core writes.
struct Bulk {
    batch: Vec<BulkEntry>,
    next: u64,
    /// Entries handed over and not written yet (the last one of each device), for `rules`.
    unwritten: Unwritten,
    to_writer: std::sync::mpsc::SyncSender<Vec<BulkEntry>>,
    writer: std::thread::JoinHandle<Vec<(DeviceKey, DataPlaneError)>>,
}

impl Bulk {
    fn start(pins: &Path, capacity: u32) -> Result<Self, DataPlaneError> {
        let FlowKeys { mut v4, mut v6 } = FlowKeys::open(pins)?;
        // A few batches in flight: the admitting side waits when the writer falls behind.
        let (to_writer, batches) = std::sync::mpsc::sync_channel::<Vec<BulkEntry>>(4);
        let unwritten: Unwritten = Arc::default();
        let written = Arc::clone(&unwritten);
        let writer = std::thread::Builder::new()
            .name("qodd-bulk".into())
            .spawn(move || {
                let mut refused = Vec::new();
                for batch in batches {
                    let mut failed = std::collections::HashSet::new();
                    for &(seq, key, value) in &batch {
                        if let Err(e) = write_entry(&mut v4, &mut v6, capacity, key, value) {
                            refused.push((key, e));
                            failed.insert(seq);
                        }
                    }
                    let mut unwritten = written.lock();
                    for (seq, key, _) in batch {
                        // Only if nothing later was handed over for the device meanwhile; a
                        // refused one stays, so that it is reported even if this thread stops.
                        if !failed.contains(&seq)
                            && unwritten.get(&key).is_some_and(|(s, _)| *s == seq)
                        {
                            unwritten.remove(&key);
                        }
                    }
                }
                refused
            })
            .map_err(DataPlaneError::Thread)?;
        Ok(Self {
            batch: Vec::with_capacity(BULK_BATCH),
            next: 0,
            unwritten,
            to_writer,
            writer,
        })
    }

    fn hand_over(&mut self, key: DeviceKey, value: Option<DeviceRules>) {
        self.next += 1;
        self.unwritten.lock().insert(key, (self.next, value));
        self.batch.push((self.next, key, value));
        if self.batch.len() >= BULK_BATCH {
            self.send();
        }
    }

    fn send(&mut self) {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BULK_BATCH));
        // Refused only if the writer is gone (it panicked): `end` reports what it left.
        let _ = self.to_writer.send(batch);
    }

    fn unwritten(&self, key: &DeviceKey) -> Option<Option<DeviceRules>> {
        self.unwritten.lock().get(key).map(|(_, v)| *v)
    }

    fn end(mut self) -> Vec<(DeviceKey, DataPlaneError)> {
        self.send();
        drop(self.to_writer);
        match self.writer.join() {
            Ok(refused) => refused,
            // Every entry it may not have written counts as refused.
            Err(_) => self
                .unwritten
                .lock()
                .keys()
                .map(|k| {
                    let e = std::io::Error::other("the bulk writer stopped");
                    (*k, DataPlaneError::Thread(e))
                })
                .collect(),
        }
    }
}

/// The flow maps opened a second time: their keys listed from any thread, or a restore's
/// entries written by the bulk writer.
struct FlowKeys {
    v4: HashMap<MapData, u32, DeviceRules>,
    v6: HashMap<MapData, [u32; 2], DeviceRules>,
}

impl FlowKeys {
    /// The flow maps opened again from their pins under `pins`.
    fn open(pins: &Path) -> Result<Self, DataPlaneError> {
        let map_err = |map: &'static str| move |source| DataPlaneError::Map { map, source };
        let open = |name: &'static str| {
            MapData::from_pin(pins.join(name))
                .and_then(aya::maps::Map::from_map_data)
                .map_err(map_err(name))
        };
        Ok(Self {
            v4: HashMap::try_from(open(FLOWS_V4_MAP)?).map_err(map_err(FLOWS_V4_MAP))?,
            v6: HashMap::try_from(open(FLOWS_V6_MAP)?).map_err(map_err(FLOWS_V6_MAP))?,
        })
    }

    /// Every entry, a batch per system call.
    fn batched(&self) -> Result<super::KernelEntries, DataPlaneError> {
        use aya::maps::IterableMap as _;
        let failed = |map| {
            move |e: std::io::Error| DataPlaneError::Map {
                map,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error: e,
                }),
            }
        };
        let mut found = super::KernelEntries::default();
        let add = |found: &mut super::KernelEntries, key, v: &DeviceRules| {
            found.add(key, held_rules(v));
        };
        super::batch::hash_entries::<u32, DeviceRules>(self.v4.map().fd().as_fd(), |k, v| {
            k.iter()
                .zip(v)
                .for_each(|(k, v)| add(&mut found, v4_key(*k), v));
        })
        .map_err(failed(FLOWS_V4_MAP))?;
        super::batch::hash_entries::<[u32; 2], DeviceRules>(self.v6.map().fd().as_fd(), |k, v| {
            k.iter()
                .zip(v)
                .for_each(|(k, v)| add(&mut found, v6_key(*k), v));
        })
        .map_err(failed(FLOWS_V6_MAP))?;
        Ok(found)
    }
}

impl super::DeviceLister for FlowKeys {
    fn device_entries(&self) -> Result<super::KernelEntries, DataPlaneError> {
        // Entry by entry where the kernel does not do batches.
        if let Ok(found) = self.batched() {
            return Ok(found);
        }
        let map_err = |map| move |source| DataPlaneError::Map { map, source };
        let mut found = super::KernelEntries::default();
        for entry in self.v4.iter() {
            let (k, v) = entry.map_err(map_err(FLOWS_V4_MAP))?;
            found.add(v4_key(k), held_rules(&v));
        }
        for entry in self.v6.iter() {
            let (k, v) = entry.map_err(map_err(FLOWS_V6_MAP))?;
            found.add(v6_key(k), held_rules(&v));
        }
        Ok(found)
    }
}

/// The counters map opened a second time: reads only, from any thread.
struct CountersMap(PerCpuArray<MapData, FlowCounters>);

impl super::CountersReader for CountersMap {
    fn counters(&self, slot: u32) -> Result<FlowCounters, DataPlaneError> {
        sum_counters(&self.0, slot)
    }
}

/// The counters at `slot`, summed over CPUs.
fn sum_counters(
    map: &PerCpuArray<MapData, FlowCounters>,
    slot: u32,
) -> Result<FlowCounters, DataPlaneError> {
    let per_cpu = map.get(&slot, 0).map_err(|source| DataPlaneError::Map {
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
            up_dropped_bytes: a.up_dropped_bytes + c.up_dropped_bytes,
            down_dropped_bytes: a.down_dropped_bytes + c.down_dropped_bytes,
        }))
}
