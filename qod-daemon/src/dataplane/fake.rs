use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use qod_common::{DeviceKey, FlowCounters, FlowRule, ProfileTreatment, Treatment};

use super::{DataPlane, DataPlaneError};

/// In-memory data plane for unit tests: the map contents are shared so a test can inspect them,
/// and `fail_next_install` injects a failure.
#[derive(Clone, Debug, Default)]
pub struct FakeDataPlane {
    pub state: Arc<Mutex<FakeState>>,
    held: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

#[derive(Debug, Default)]
pub struct FakeState {
    pub flows: HashMap<DeviceKey, Vec<FlowRule>>,
    /// The profile entries in use, by index.
    pub profiles: HashMap<u16, ProfileTreatment>,
    /// Profile entry writes left to succeed before one fails (`None`: all do).
    pub profile_writes_left: Option<usize>,
    pub counters: HashMap<u32, FlowCounters>,
    pub fail_next_install: bool,
    /// Between `begin_bulk` and `end_bulk`.
    pub bulk: bool,
    /// Devices whose entry `end_bulk` reports refused (and takes out).
    pub refuse_in_bulk: Vec<DeviceKey>,
    /// Entries written so far.
    pub installs: usize,
    /// (interface, class index) → class
    pub classes: HashMap<(String, u16), super::scheduler::ClassSpec>,
    /// (interface, class index) → what the class reports (zero when absent)
    pub class_stats: HashMap<(String, u16), super::TcStats>,
    /// (interface, class index) of the classes parked (in the kernel, held by no session)
    pub parked: std::collections::HashSet<(String, u16)>,
    pub reattached: Vec<String>,
    pub classes_waiting: usize,
}

impl FakeState {
    /// What the classifier would do to `rule`'s packets under its profile entry (`None` when
    /// that entry is not in use: the packets would be left alone).
    pub fn treated(&self, rule: &FlowRule) -> Option<Treatment> {
        self.profiles.get(&rule.profile).map(|t| rule.treated(t))
    }
}

impl FakeDataPlane {
    /// Makes every `set_class` wait until [`Self::release_classes`] (a class being made, as in
    /// a large tree, takes milliseconds).
    pub fn hold_classes(&self) {
        *self.held.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }

    pub fn release_classes(&self) {
        *self.held.0.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.held.1.notify_all();
    }

    /// `set_class` calls waiting in [`Self::hold_classes`].
    pub fn classes_waiting(&self) -> usize {
        self.state().classes_waiting
    }

    fn wait_while_classes_held(&self) {
        self.state().classes_waiting += 1;
        let mut held = self.held.0.lock().unwrap_or_else(|p| p.into_inner());
        while *held {
            held = self.held.1.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        drop(held);
        self.state().classes_waiting -= 1;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        // A test that panicked while holding the lock has already failed; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl super::Classes for FakeDataPlane {
    fn set_class(
        &self,
        interface: &str,
        index: u16,
        spec: super::scheduler::ClassSpec,
    ) -> Result<super::TcStats, DataPlaneError> {
        self.wait_while_classes_held();
        let key = (interface.to_owned(), index);
        let mut s = self.state();
        s.parked.remove(&key);
        s.classes.insert(key.clone(), spec);
        Ok(s.class_stats.get(&key).copied().unwrap_or_default())
    }

    fn park_class(&self, interface: &str, index: u16) -> Result<(), DataPlaneError> {
        let key = (interface.to_owned(), index);
        let mut s = self.state();
        s.classes.remove(&key);
        s.parked.insert(key);
        Ok(())
    }

    fn class_stats(&self, interface: &str, index: u16) -> Result<super::TcStats, DataPlaneError> {
        let s = self.state();
        let key = (interface.to_owned(), index);
        if !s.classes.contains_key(&key) && !s.parked.contains(&key) {
            return Err(DataPlaneError::Scheduler {
                interface: interface.to_owned(),
                what: format!("no class {index}"),
            });
        }
        Ok(s.class_stats.get(&key).copied().unwrap_or_default())
    }
}

impl super::DeviceLister for FakeDataPlane {
    fn device_entries(&self) -> Result<super::KernelEntries, DataPlaneError> {
        let mut found = super::KernelEntries::default();
        for (key, rules) in &self.state().flows {
            found.add(*key, rules);
        }
        Ok(found)
    }
}

impl DataPlane for FakeDataPlane {
    fn install(&mut self, key: DeviceKey, rules: &[FlowRule]) -> Result<(), DataPlaneError> {
        let mut s = self.state();
        if std::mem::take(&mut s.fail_next_install) {
            return Err(DataPlaneError::Full { capacity: 0 });
        }
        s.installs += 1;
        s.flows.insert(key, rules.to_vec());
        Ok(())
    }

    fn rules(&self, key: &DeviceKey) -> Result<Vec<FlowRule>, DataPlaneError> {
        Ok(self.state().flows.get(key).cloned().unwrap_or_default())
    }

    fn begin_bulk(&mut self) -> Result<(), DataPlaneError> {
        self.state().bulk = true;
        Ok(())
    }

    fn end_bulk(&mut self) -> Vec<(DeviceKey, DataPlaneError)> {
        let mut s = self.state();
        if !std::mem::take(&mut s.bulk) {
            return Vec::new();
        }
        let refused = std::mem::take(&mut s.refuse_in_bulk);
        refused
            .into_iter()
            .filter(|key| s.flows.remove(key).is_some())
            .map(|key| (key, DataPlaneError::Full { capacity: 0 }))
            .collect()
    }

    fn remove(&mut self, key: &DeviceKey) -> Result<(), DataPlaneError> {
        self.state().flows.remove(key);
        Ok(())
    }

    fn entries(&self) -> Result<Vec<(DeviceKey, Vec<FlowRule>)>, DataPlaneError> {
        Ok(self
            .state()
            .flows
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    fn band_counters(
        &self,
    ) -> Result<
        Vec<(
            String,
            [qod_common::BandCounters; qod_common::BANDS as usize],
        )>,
        DataPlaneError,
    > {
        Ok(Vec::new())
    }

    fn device_lister(&self) -> Arc<dyn super::DeviceLister> {
        Arc::new(self.clone())
    }

    fn counters(&self, slot: u32) -> Result<FlowCounters, DataPlaneError> {
        super::CountersReader::counters(self, slot)
    }

    fn counters_reader(&self) -> Arc<dyn super::CountersReader> {
        Arc::new(self.clone())
    }

    fn reset_counters(&mut self, slot: u32) -> Result<(), DataPlaneError> {
        self.state().counters.remove(&slot);
        Ok(())
    }

    fn set_profile(&mut self, index: u16, t: &ProfileTreatment) -> Result<(), DataPlaneError> {
        let mut s = self.state();
        match s.profile_writes_left {
            Some(0) => {
                s.profile_writes_left = None;
                return Err(DataPlaneError::Full { capacity: 0 });
            }
            Some(left) => s.profile_writes_left = Some(left - 1),
            None => {}
        }
        if t.in_use == 0 {
            s.profiles.remove(&index);
        } else {
            s.profiles.insert(index, *t);
        }
        Ok(())
    }

    fn profiles(&self) -> Result<Vec<(u16, ProfileTreatment)>, DataPlaneError> {
        Ok(self
            .state()
            .profiles
            .iter()
            .map(|(i, t)| (*i, *t))
            .collect())
    }

    fn take_profile_out_of_use(&mut self, index: u16) -> Result<(), DataPlaneError> {
        // The fake keeps only the entries in use.
        self.state().profiles.remove(&index);
        Ok(())
    }

    fn classes(&self) -> Arc<dyn super::Classes> {
        Arc::new(self.clone())
    }

    fn session_classes(&self, interface: &str) -> Result<Vec<u16>, DataPlaneError> {
        let s = self.state();
        Ok(s.classes
            .keys()
            .chain(s.parked.iter())
            .filter(|(i, _)| i == interface)
            .map(|(_, index)| *index)
            .collect())
    }

    fn reattach(&mut self, interface: &str) -> Result<(), DataPlaneError> {
        self.state().reattached.push(interface.to_owned());
        Ok(())
    }
}

impl super::CountersReader for FakeDataPlane {
    fn counters(&self, slot: u32) -> Result<FlowCounters, DataPlaneError> {
        Ok(self
            .state()
            .counters
            .get(&slot)
            .copied()
            .unwrap_or_default())
    }
}
