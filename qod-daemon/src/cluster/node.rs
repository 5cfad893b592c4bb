//! A node's registration record in etcd, and the rule that decides whether a node may join
//! beside the others (pure: unit-tested without etcd).

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::Role;

/// The schema version of [`NodeRecord`]. A reader takes the fields it knows from a newer one
/// (fields are only ever added), so nodes of two versions can share a cluster during an upgrade.
pub const RECORD_VERSION: u32 = 1;

/// What a node publishes about itself under `<prefix>nodes/<id>`, attached to its lease: the key
/// disappears when the node stops or its lease lapses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// [`RECORD_VERSION`] of the writer.
    pub v: u32,
    pub id: String,
    /// Random, kept in the node's state directory: tells a restart of this node (which may
    /// take over its own lingering registration) from another process using the same id.
    pub instance: String,
    pub role: Role,
    pub pools: Vec<IpNetwork>,
    pub advertise: Vec<String>,
    pub interfaces: Vec<InterfaceRecord>,
    /// qodd's version.
    pub version: String,
    /// RFC 3339.
    pub started_at: String,
    /// Live sessions, as last published (every few seconds when it changes).
    #[serde(default)]
    pub sessions: u64,
    /// The active node whose pools and sessions this one took over (a standby that became
    /// active): that node, back, joins as this one's standby.
    #[serde(default)]
    pub took_over: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceRecord {
    pub name: String,
    /// 0: not scheduled by qodd.
    pub capacity_bps: u64,
}

/// Why a node may not join.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Clash {
    #[error(
        "node id {id:?} is registered by another qodd (instance {instance}, API at {advertise:?}); node ids must be unique"
    )]
    IdInUse {
        id: String,
        instance: String,
        advertise: Vec<String>,
    },
    #[error(
        "ue_pools {mine} of this active node overlaps {theirs} of active node {other:?}: a device must have one active node"
    )]
    Pools {
        mine: IpNetwork,
        theirs: IpNetwork,
        other: String,
    },
    #[error(
        "{standby:?} is a standby for {active:?}, so its ue_pools must be the same: {standby_pools:?} against {active_pools:?}"
    )]
    NotAPair {
        standby: String,
        active: String,
        standby_pools: Vec<String>,
        active_pools: Vec<String>,
    },
    #[error(
        "ue_pools {mine} overlaps {theirs} of standby node {other:?}: a pool has at most one standby"
    )]
    SecondStandby {
        mine: IpNetwork,
        theirs: IpNetwork,
        other: String,
    },
}

/// Whether two networks share an address.
pub fn overlap(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

/// Whether any network of `a` overlaps one of `b`.
pub fn overlap_any(a: &[IpNetwork], b: &[IpNetwork]) -> bool {
    first_overlap(a, b).is_some()
}

fn first_overlap(mine: &[IpNetwork], theirs: &[IpNetwork]) -> Option<(IpNetwork, IpNetwork)> {
    mine.iter()
        .flat_map(|m| theirs.iter().map(move |t| (*m, *t)))
        .find(|(m, t)| overlap(m, t))
}

/// The node among `others` that took `me`'s pools over while `me` was away, if any.
pub fn replaced_by<'a>(me: &NodeRecord, others: &'a [NodeRecord]) -> Option<&'a NodeRecord> {
    others.iter().find(|o| {
        o.id != me.id
            && o.role == Role::Active
            && o.took_over.as_deref() == Some(me.id.as_str())
            && same_pools(&o.pools, &me.pools)
    })
}

pub fn same_pools(a: &[IpNetwork], b: &[IpNetwork]) -> bool {
    let mut a: Vec<_> = a.to_vec();
    let mut b: Vec<_> = b.to_vec();
    a.sort();
    a.dedup();
    b.sort();
    b.dedup();
    a == b
}

/// Whether `me` may join beside `others` (the live registrations, possibly including an
/// earlier one of `me` itself). The rules: node ids are unique; two active nodes' pools do not
/// overlap; a standby overlaps only the active it pairs with, whose pools it declares exactly;
/// a pool has at most one standby.
pub fn may_join(me: &NodeRecord, others: &[NodeRecord]) -> Result<(), Clash> {
    for o in others {
        if o.id == me.id {
            if o.instance == me.instance {
                // This node's own registration from before a restart: it is replaced.
                continue;
            }
            return Err(Clash::IdInUse {
                id: o.id.clone(),
                instance: o.instance.clone(),
                advertise: o.advertise.clone(),
            });
        }
        let Some((mine, theirs)) = first_overlap(&me.pools, &o.pools) else {
            continue;
        };
        match (me.role, o.role) {
            (Role::Active, Role::Active) => {
                return Err(Clash::Pools {
                    mine,
                    theirs,
                    other: o.id.clone(),
                });
            }
            (Role::Standby, Role::Standby) => {
                return Err(Clash::SecondStandby {
                    mine,
                    theirs,
                    other: o.id.clone(),
                });
            }
            (Role::Standby, Role::Active) | (Role::Active, Role::Standby) => {
                if !same_pools(&me.pools, &o.pools) {
                    let (standby, active) = if me.role == Role::Standby {
                        (me, o)
                    } else {
                        (o, me)
                    };
                    let show = |p: &[IpNetwork]| p.iter().map(ToString::to_string).collect();
                    return Err(Clash::NotAPair {
                        standby: standby.id.clone(),
                        active: active.id.clone(),
                        standby_pools: show(&standby.pools),
                        active_pools: show(&active.pools),
                    });
                }
            }
        }
    }
    Ok(())
}

/// The active node among `nodes` whose pools hold `addr`: the one that serves it (pools of
/// active nodes do not overlap, so there is at most one).
pub fn serving(addr: std::net::IpAddr, nodes: &[NodeRecord]) -> Option<&NodeRecord> {
    nodes
        .iter()
        .find(|n| n.role == Role::Active && n.pools.iter().any(|p| p.contains(addr)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, role: Role, pools: &[&str]) -> NodeRecord {
        NodeRecord {
            v: RECORD_VERSION,
            id: id.into(),
            instance: format!("{id}-1"),
            role,
            pools: pools.iter().map(|p| p.parse().expect("cidr")).collect(),
            advertise: vec![format!("{id}:50051")],
            interfaces: vec![],
            version: "0".into(),
            started_at: "2026-12-04T00:00:00Z".into(),
            sessions: 0,
            took_over: None,
        }
    }

    #[test]
    fn active_nodes_with_disjoint_pools_join() {
        let a = node("a", Role::Active, &["10.1.0.0/16", "fd00:1::/64"]);
        let b = node("b", Role::Active, &["10.2.0.0/16", "fd00:2::/64"]);
        assert_eq!(may_join(&b, std::slice::from_ref(&a)), Ok(()));
    }

    #[test]
    fn overlapping_actives_are_refused_naming_both_pools() {
        let a = node("a", Role::Active, &["10.1.0.0/16"]);
        let b = node("b", Role::Active, &["10.9.0.0/16", "10.1.7.0/24"]);
        let err = may_join(&b, &[a]).expect_err("clash");
        assert_eq!(
            err,
            Clash::Pools {
                mine: "10.1.7.0/24".parse().expect("cidr"),
                theirs: "10.1.0.0/16".parse().expect("cidr"),
                other: "a".into(),
            }
        );
        assert!(
            err.to_string()
                .contains("10.1.7.0/24 of this active node overlaps 10.1.0.0/16")
        );
    }

    #[test]
    fn an_address_is_served_by_the_active_node_of_its_pool_not_its_standby() {
        let nodes = [
            node("a2", Role::Standby, &["10.1.0.0/16"]),
            node("a", Role::Active, &["10.1.0.0/16"]),
            node("b", Role::Active, &["10.2.0.0/16", "fd00:2::/64"]),
        ];
        let at = |a: &str| serving(a.parse().expect("addr"), &nodes).map(|n| n.id.as_str());
        assert_eq!(at("10.1.2.3"), Some("a"));
        assert_eq!(at("fd00:2::9"), Some("b"));
        assert_eq!(at("10.3.0.1"), None);
    }

    #[test]
    fn families_do_not_overlap() {
        let v4: IpNetwork = "0.0.0.0/0".parse().expect("cidr");
        let v6: IpNetwork = "::/0".parse().expect("cidr");
        assert!(!overlap(&v4, &v6));
        assert!(overlap(&v6, &"fd00::/8".parse().expect("cidr")));
    }

    #[test]
    fn a_standby_pairs_with_the_active_of_the_same_pools_only() {
        let a = node("a", Role::Active, &["10.1.0.0/16", "10.3.0.0/16"]);
        let same = node("a2", Role::Standby, &["10.3.0.0/16", "10.1.0.0/16"]);
        assert_eq!(may_join(&same, std::slice::from_ref(&a)), Ok(()));
        // The pair is checked from either side: an active joining beside its standby.
        assert_eq!(may_join(&a, std::slice::from_ref(&same)), Ok(()));
        let part = node("a3", Role::Standby, &["10.1.0.0/16"]);
        assert!(matches!(
            may_join(&part, std::slice::from_ref(&a)),
            Err(Clash::NotAPair { .. })
        ));
        let second = node("a4", Role::Standby, &["10.1.0.0/16", "10.3.0.0/16"]);
        assert!(matches!(
            may_join(&second, &[a, same]),
            Err(Clash::SecondStandby { .. })
        ));
    }

    #[test]
    fn an_id_is_one_node_but_a_restart_replaces_its_own_registration() {
        let a = node("a", Role::Active, &["10.1.0.0/16"]);
        let restarted = a.clone();
        assert_eq!(may_join(&restarted, std::slice::from_ref(&a)), Ok(()));
        let mut impostor = node("a", Role::Active, &["10.7.0.0/16"]);
        impostor.instance = "other".into();
        assert!(matches!(
            may_join(&impostor, &[a]),
            Err(Clash::IdInUse { .. })
        ));
    }

    #[test]
    fn an_active_that_was_taken_over_finds_its_replacement() {
        let a = node("a", Role::Active, &["10.1.0.0/16"]);
        let mut b = node("b", Role::Active, &["10.1.0.0/16"]);
        assert!(replaced_by(&a, std::slice::from_ref(&b)).is_none());
        b.took_over = Some("a".into());
        assert_eq!(
            replaced_by(&a, std::slice::from_ref(&b)).map(|n| n.id.as_str()),
            Some("b")
        );
        let mut other = node("c", Role::Active, &["10.1.0.0/16"]);
        other.took_over = Some("a".into());
        other.pools = vec!["10.9.0.0/16".parse().expect("cidr")];
        assert!(replaced_by(&a, &[other]).is_none(), "not its pools");
    }

    #[test]
    fn records_of_a_newer_schema_are_read_for_the_fields_known() {
        let mut json =
            serde_json::to_value(node("a", Role::Standby, &["10.1.0.0/16"])).expect("encode");
        json["v"] = 2.into();
        json["future_field"] = "x".into();
        let r: NodeRecord = serde_json::from_value(json).expect("decode");
        assert_eq!(r.role, Role::Standby);
        assert_eq!(r.v, 2);
    }
}
