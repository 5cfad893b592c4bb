//! Which entry of the classifier's profile table (`qod_common::PROFILES_MAP`) each QoS profile
//! holds. A session's rule names its profile's entry; what the profile does to packets (DSCP,
//! band, priority and policer where the session's own classes do not decide) lives in that entry
//! alone, so a reload changes it for every session of the profile with one map update.
//!
//! Entries are found again after a restart by the hash of the profile's name that each carries,
//! so a profile keeps its entry across restarts over the pinned maps (and the kernel's rules
//! stay right meanwhile). A profile that leaves the policy keeps its entry, retired, until its
//! sessions have been ended; only then is the entry freed.

use std::collections::HashMap;

use qod_common::MAX_PROFILES;

use crate::{dataplane::DataPlaneError, model::ProfileName};

/// FNV-1a (64 bits) of a profile's name: stable across builds and runs, unlike std's hasher.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Failure to give the policy's profiles their entries.
#[derive(Debug, thiserror::Error)]
pub enum ProfileTableError {
    #[error(
        "the classifier's profile table has {free} free entries and {needed} new profiles need one each (profiles a reload retired hold theirs until that reload has ended their sessions; try again then)"
    )]
    Full { needed: usize, free: usize },
    #[error("cannot write the profile table")]
    DataPlane(#[from] DataPlaneError),
}

/// The profile table as qodd keeps track of it.
#[derive(Debug)]
pub struct ProfileTable {
    /// The entry of each profile of the policy in force.
    by_name: HashMap<ProfileName, u16>,
    /// Each entry's holder (its name's hash); `None` when free.
    held: Vec<Option<u64>>,
    /// Entries a previous run left that no profile of this run holds: rules the kernel kept
    /// from that run may point at them until the start has removed its orphans.
    inherited: Vec<bool>,
}

impl Default for ProfileTable {
    fn default() -> Self {
        Self::adopt([])
    }
}

/// The entries [`ProfileTable::plan`] gives a policy's profiles, for [`ProfileTable::commit`]
/// once they are written.
#[derive(Debug)]
pub struct Plan {
    by_name: HashMap<ProfileName, u16>,
}

impl Plan {
    /// Every profile's entry, in the order of the entries.
    pub fn entries(&self) -> impl Iterator<Item = (&ProfileName, u16)> {
        let mut all: Vec<(&ProfileName, u16)> = self.by_name.iter().map(|(n, i)| (n, *i)).collect();
        all.sort_unstable_by_key(|(_, i)| *i);
        all.into_iter()
    }
}

impl ProfileTable {
    /// The table as the kernel holds it: `in_use` are the entries a previous run left (index,
    /// name hash), inherited until [`Self::commit`] gives them to the policy's profiles.
    pub fn adopt(in_use: impl IntoIterator<Item = (u16, u64)>) -> Self {
        let mut held = vec![None; MAX_PROFILES as usize];
        let mut inherited = vec![false; MAX_PROFILES as usize];
        for (index, hash) in in_use {
            if let Some(h) = held.get_mut(usize::from(index)) {
                *h = Some(hash);
                inherited[usize::from(index)] = true;
            }
        }
        Self {
            by_name: HashMap::new(),
            held,
            inherited,
        }
    }

    /// The entries for the profiles in `names`: the one a profile holds already, or the one
    /// a previous run gave its name, else a free one. Changes nothing; refuses when the free
    /// entries are too few.
    pub fn plan<'a>(
        &self,
        names: impl IntoIterator<Item = &'a ProfileName>,
    ) -> Result<Plan, ProfileTableError> {
        let mut by_name = HashMap::new();
        let mut taken = vec![false; self.held.len()];
        let mut wanting = Vec::new();
        for name in names {
            let hash = name_hash(name.as_str());
            let kept = self.by_name.get(name).copied().or_else(|| {
                (0..self.held.len())
                    .find(|i| self.held[*i] == Some(hash) && !taken[*i])
                    .map(|i| i as u16)
            });
            match kept {
                Some(index) if !taken[usize::from(index)] => {
                    taken[usize::from(index)] = true;
                    by_name.insert(name.clone(), index);
                }
                _ => wanting.push(name),
            }
        }
        let free: Vec<u16> = (0..self.held.len())
            .filter(|i| self.held[*i].is_none())
            .map(|i| i as u16)
            .collect();
        if free.len() < wanting.len() {
            return Err(ProfileTableError::Full {
                needed: wanting.len(),
                free: free.len(),
            });
        }
        for (name, index) in wanting.into_iter().zip(free) {
            by_name.insert(name.clone(), index);
        }
        Ok(Plan { by_name })
    }

    /// Makes `plan` the policy in force's entries (once they are written). The entries of
    /// profiles it leaves out stay held (retired) until [`Self::release`].
    pub fn commit(&mut self, plan: Plan) {
        for (name, index) in &plan.by_name {
            self.held[usize::from(*index)] = Some(name_hash(name.as_str()));
            self.inherited[usize::from(*index)] = false;
        }
        self.by_name = plan.by_name;
    }

    /// The entry of a profile of the policy in force.
    pub fn index(&self, name: &ProfileName) -> Option<u16> {
        self.by_name.get(name).copied()
    }

    /// The profile of the policy in force holding entry `index`.
    pub fn name_of(&self, index: u16) -> Option<&ProfileName> {
        self.by_name
            .iter()
            .find(|(_, i)| **i == index)
            .map(|(n, _)| n)
    }

    /// The name hash of entry `index`'s holder, if it is held.
    pub fn holder(&self, index: u16) -> Option<u64> {
        self.held.get(usize::from(index)).copied().flatten()
    }

    /// The retired entries (held, by no profile of the policy in force); with
    /// `with_inherited`, those a previous run left too.
    pub fn retired(&self, with_inherited: bool) -> Vec<u16> {
        let mut current = vec![false; self.held.len()];
        for index in self.by_name.values() {
            current[usize::from(*index)] = true;
        }
        (0..self.held.len())
            .filter(|i| self.held[*i].is_some() && !current[*i])
            .filter(|i| with_inherited || !self.inherited[*i])
            .map(|i| i as u16)
            .collect()
    }

    /// Frees retired entry `index` (no rule refers to it any more).
    pub fn release(&mut self, index: u16) {
        if self.name_of(index).is_none()
            && let Some(h) = self.held.get_mut(usize::from(index))
        {
            *h = None;
            self.inherited[usize::from(index)] = false;
        }
    }

    /// Frees every entry a previous run left (at a start whose table is too full to hold the
    /// new profiles otherwise); returns them.
    pub fn drop_inherited(&mut self) -> Vec<u16> {
        let gone: Vec<u16> = (0..self.held.len())
            .filter(|i| self.inherited[*i])
            .map(|i| i as u16)
            .collect();
        for i in &gone {
            self.held[usize::from(*i)] = None;
            self.inherited[usize::from(*i)] = false;
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<ProfileName> {
        list.iter()
            .map(|n| ProfileName::parse("name", n).expect("name"))
            .collect()
    }

    fn assign(t: &mut ProfileTable, list: &[&str]) -> HashMap<String, u16> {
        let plan = t.plan(names(list).iter()).expect("plan");
        let out = plan.entries().map(|(n, i)| (n.to_string(), i)).collect();
        t.commit(plan);
        out
    }

    fn release_retired(t: &mut ProfileTable, with_inherited: bool) -> Vec<u16> {
        let retired = t.retired(with_inherited);
        for i in &retired {
            t.release(*i);
        }
        retired
    }

    #[test]
    fn a_profile_keeps_its_entry_across_reloads_and_restarts() {
        let mut t = ProfileTable::default();
        let first = assign(&mut t, &["QOS_E", "QOS_S"]);
        assert_ne!(first["QOS_E"], first["QOS_S"]);
        // A reload adding a profile and dropping one.
        let second = assign(&mut t, &["QOS_E", "QOS_L"]);
        assert_eq!(second["QOS_E"], first["QOS_E"]);
        assert_ne!(
            second["QOS_L"], first["QOS_S"],
            "QOS_S is retired, not free"
        );
        assert_eq!(t.name_of(first["QOS_S"]), None);
        assert_eq!(release_retired(&mut t, false), vec![first["QOS_S"]]);
        assert!(release_retired(&mut t, true).is_empty());
        // A restart over the pinned table, the profiles listed in another order.
        let pinned = [
            (second["QOS_E"], name_hash("QOS_E")),
            (second["QOS_L"], name_hash("QOS_L")),
        ];
        let mut again = ProfileTable::adopt(pinned);
        let third = assign(&mut again, &["QOS_M", "QOS_E"]);
        assert_eq!(third["QOS_E"], second["QOS_E"]);
        assert_ne!(
            third["QOS_M"], second["QOS_L"],
            "QOS_L's entry is inherited, not free"
        );
        // What the previous run left is freed with the start's orphans, not by a reload.
        assert!(release_retired(&mut again, false).is_empty());
        assert_eq!(release_retired(&mut again, true), vec![second["QOS_L"]]);
    }

    #[test]
    fn a_table_too_full_for_the_new_profiles_refuses_and_changes_nothing() {
        let mut t = ProfileTable::default();
        let all: Vec<String> = (0..MAX_PROFILES).map(|i| format!("QOS_P{i}")).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let first = assign(&mut t, &refs[..200]);
        // 200 held, 56 free: a reload replacing them all with 100 new profiles is refused.
        let others: Vec<String> = (0..100).map(|i| format!("QOS_Q{i}")).collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        let e = t
            .plan(names(&others).iter())
            .expect_err("too few free entries");
        assert!(
            matches!(
                e,
                ProfileTableError::Full {
                    needed: 100,
                    free: 56
                }
            ),
            "{e}"
        );
        // Nothing changed: the policy in force keeps its entries.
        for (name, index) in &first {
            assert_eq!(
                t.index(&ProfileName::parse("name", name).expect("name")),
                Some(*index)
            );
        }
        assert!(t.retired(true).is_empty());
    }
}
