//! What the node serves: its QoS profiles, the device address pools, the device directory, and
//! the error flavour for durations. Reloadable as one unit (SIGHUP).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnetwork::IpNetwork;
use qod_common::{DeviceKey, FAMILY_IPV4};

use crate::{
    error::{CamaraCode, CamaraError},
    model::{ApplicationServer, DeviceId, PhoneNumber, ipv4_key, ipv6_key},
    profile::Profiles,
};

/// Addresses a directory entry maps a phone number to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceAddresses {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub profiles: Profiles,
    /// Device address pools this node serves; empty means any address.
    pub pools: Vec<IpNetwork>,
    /// Phone number → addresses.
    pub directory: HashMap<PhoneNumber, DeviceAddresses>,
    /// Code for a duration outside the profile's bounds: CAMARA's
    /// `QUALITY_ON_DEMAND.DURATION_OUT_OF_RANGE`, or `INVALID_ARGUMENT` as CAMARA's test 400.9 expects.
    pub duration_error: CamaraCode,
}

fn not_served(field: &str, what: String) -> CamaraError {
    CamaraError::field(CamaraCode::IdentifierNotFound, field, what)
}

impl Policy {
    fn served(&self, addr: IpAddr) -> bool {
        self.pools.is_empty() || self.pools.iter().any(|p| p.contains(addr))
    }

    fn check(&self, field: &str, addr: IpAddr) -> Result<(), CamaraError> {
        if self.served(addr) {
            Ok(())
        } else {
            Err(not_served(
                field,
                format!("{addr} is not in any device address pool of this node"),
            ))
        }
    }

    /// The key the classifier knows `device` by, in a family the application server has.
    pub fn resolve(
        &self,
        device: &DeviceId,
        server: &ApplicationServer,
    ) -> Result<DeviceKey, CamaraError> {
        let keys = self.resolve_all(device)?;
        let family = |k: &DeviceKey| {
            if k.family == FAMILY_IPV4 {
                "IPv4"
            } else {
                "IPv6"
            }
        };
        keys.iter()
            .copied()
            .find(|k| server.network(k.family).is_some())
            .ok_or_else(|| {
                CamaraError::invalid(
                    "applicationServer",
                    format!(
                        "the device is known by an {} address but the application server has no address of that family",
                        keys.first().map_or("IP", family)
                    ),
                )
            })
    }

    /// The addresses `device` stands for, whichever node serves them (a cluster routes a call
    /// by them): the address given, or the directory's for a phone number.
    pub fn addresses(&self, device: &DeviceId) -> Vec<IpAddr> {
        match device {
            DeviceId::Ipv4 {
                public, private, ..
            } => vec![IpAddr::V4(private.unwrap_or(*public))],
            DeviceId::Ipv6(addr) => vec![IpAddr::V6(*addr)],
            DeviceId::PhoneNumber(p) => self.directory.get(p).map_or_else(Vec::new, |e| {
                e.ipv4
                    .map(IpAddr::V4)
                    .into_iter()
                    .chain(e.ipv6.map(IpAddr::V6))
                    .collect()
            }),
        }
    }

    /// Every key `device` may be known by (a directory entry can have both families).
    pub fn resolve_all(&self, device: &DeviceId) -> Result<Vec<DeviceKey>, CamaraError> {
        match device {
            DeviceId::Ipv4 {
                public, private, ..
            } => {
                let addr = private.unwrap_or(*public);
                self.check("device.ipv4Address", IpAddr::V4(addr))?;
                Ok(vec![ipv4_key(addr)])
            }
            DeviceId::Ipv6(addr) => {
                self.check("device.ipv6Address", IpAddr::V6(*addr))?;
                Ok(vec![ipv6_key(*addr)])
            }
            DeviceId::PhoneNumber(p) => {
                let entry = self.directory.get(p).ok_or_else(|| {
                    not_served(
                        "device.phoneNumber",
                        format!("{} is not in this node's device directory", p.as_str()),
                    )
                })?;
                // The operator knows the device but this node cannot serve it: CAMARA's 422
                // SERVICE_NOT_APPLICABLE. The message never names the addresses the directory
                // maps the number to: the caller did not send them.
                let keys: Vec<DeviceKey> = entry
                    .ipv4
                    .map(IpAddr::V4)
                    .into_iter()
                    .chain(entry.ipv6.map(IpAddr::V6))
                    .map(|a| {
                        if self.served(a) {
                            Ok(match a {
                                IpAddr::V4(a) => ipv4_key(a),
                                IpAddr::V6(a) => ipv6_key(a),
                            })
                        } else {
                            Err(CamaraError::field(
                                CamaraCode::ServiceNotApplicable,
                                "device.phoneNumber",
                                format!("the device {} is not served by this node", p.as_str()),
                            ))
                        }
                    })
                    .collect::<Result<_, _>>()?;
                Ok(keys)
            }
        }
    }
}
