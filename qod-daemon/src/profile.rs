//! QoS profiles (CAMARA qos-profiles 1.1.0) and how each one is enforced.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use crate::model::ProfileName;

/// CAMARA `QosProfileStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProfileStatus {
    Active,
    Inactive,
    Deprecated,
}

/// CAMARA `Rate.unit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum RateUnit {
    #[serde(rename = "bps")]
    Bps,
    #[serde(rename = "kbps")]
    Kbps,
    #[serde(rename = "Mbps")]
    Mbps,
    #[serde(rename = "Gbps")]
    Gbps,
    #[serde(rename = "Tbps")]
    Tbps,
}

/// CAMARA `Rate`: value 0..=1024 in `unit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub value: u16,
    pub unit: RateUnit,
}

impl Rate {
    pub fn bits_per_second(self) -> u64 {
        let scale: u64 = match self.unit {
            RateUnit::Bps => 1,
            RateUnit::Kbps => 1_000,
            RateUnit::Mbps => 1_000_000,
            RateUnit::Gbps => 1_000_000_000,
            RateUnit::Tbps => 1_000_000_000_000,
        };
        u64::from(self.value) * scale
    }
}

/// CAMARA `Duration.unit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum TimeUnit {
    Days,
    Hours,
    Minutes,
    Seconds,
    Milliseconds,
    Microseconds,
    Nanoseconds,
}

/// CAMARA `Duration`: value >= 1 in `unit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CamaraDuration {
    pub value: u32,
    pub unit: TimeUnit,
}

impl CamaraDuration {
    pub fn as_duration(self) -> Duration {
        let v = u64::from(self.value);
        match self.unit {
            TimeUnit::Days => Duration::from_secs(v * 86_400),
            TimeUnit::Hours => Duration::from_secs(v * 3_600),
            TimeUnit::Minutes => Duration::from_secs(v * 60),
            TimeUnit::Seconds => Duration::from_secs(v),
            TimeUnit::Milliseconds => Duration::from_millis(v),
            TimeUnit::Microseconds => Duration::from_micros(v),
            TimeUnit::Nanoseconds => Duration::from_nanos(v),
        }
    }
}

/// CAMARA `l4sQueueType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum L4sQueueType {
    NonL4sQueue,
    L4sQueue,
    MixedQueue,
}

/// CAMARA `serviceClass`, with the DSCP the digest's table assigns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceClass {
    MicrosoftVoice,
    MicrosoftAudioVideo,
    RealTimeInteractive,
    MultimediaStreaming,
    BroadcastVideo,
    LowLatencyData,
    HighThroughputData,
    LowPriorityData,
    Standard,
}

impl ServiceClass {
    pub fn dscp(self) -> u8 {
        match self {
            Self::MicrosoftVoice => 56,      // CS7
            Self::MicrosoftAudioVideo => 40, // CS5
            Self::RealTimeInteractive => 32, // CS4
            Self::MultimediaStreaming => 26, // AF31
            Self::BroadcastVideo => 24,      // CS3
            Self::LowLatencyData => 18,      // AF21
            Self::HighThroughputData => 10,  // AF11
            Self::LowPriorityData => 8,      // CS1
            Self::Standard => 0,             // DF
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MicrosoftVoice => "microsoft_voice",
            Self::MicrosoftAudioVideo => "microsoft_audio_video",
            Self::RealTimeInteractive => "real_time_interactive",
            Self::MultimediaStreaming => "multimedia_streaming",
            Self::BroadcastVideo => "broadcast_video",
            Self::LowLatencyData => "low_latency_data",
            Self::HighThroughputData => "high_throughput_data",
            Self::LowPriorityData => "low_priority_data",
            Self::Standard => "standard",
        }
    }
}

/// Which part of a managed interface's scheduler a profile's sessions use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Band {
    /// Strict-priority band, short queue: stable latency.
    LowLatency,
    /// A class of its own with the profile's target minimum rate: stable throughput.
    Guaranteed,
    /// Shares best effort (marking and the maximum rate still apply).
    BestEffort,
}

impl Band {
    /// The classifier's code for the band (`qod_common::BAND_*`).
    pub fn code(self) -> u8 {
        match self {
            Band::LowLatency => qod_common::BAND_LOW_LATENCY,
            Band::Guaranteed => qod_common::BAND_GUARANTEED,
            Band::BestEffort => qod_common::BAND_BEST_EFFORT,
        }
    }

    /// The band of a classifier code, as a metrics label (`unknown` for a code qodd never sets).
    pub fn label(code: usize) -> &'static str {
        match u8::try_from(code) {
            Ok(qod_common::BAND_LOW_LATENCY) => "low_latency",
            Ok(qod_common::BAND_GUARANTEED) => "guaranteed",
            Ok(qod_common::BAND_BEST_EFFORT) => "best_effort",
            _ => "unknown",
        }
    }
}

/// CAMARA `countryAvailability` entry.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountryAvailability {
    pub country_name: String,
    #[serde(default)]
    pub networks: Vec<String>,
}

/// A QoS profile: CAMARA's descriptive fields plus what qod writes into packets.
#[derive(Clone, Debug, PartialEq)]
pub struct QosProfile {
    pub name: ProfileName,
    pub description: String,
    pub status: ProfileStatus,
    pub country_availability: Vec<CountryAvailability>,
    pub target_min_upstream_rate: Option<Rate>,
    pub max_upstream_rate: Option<Rate>,
    pub max_upstream_burst_rate: Option<Rate>,
    pub target_min_downstream_rate: Option<Rate>,
    pub max_downstream_rate: Option<Rate>,
    pub max_downstream_burst_rate: Option<Rate>,
    pub min_duration: Option<CamaraDuration>,
    pub max_duration: Option<CamaraDuration>,
    pub priority: Option<u8>,
    pub packet_delay_budget: Option<CamaraDuration>,
    pub jitter: Option<CamaraDuration>,
    pub packet_error_loss_rate: Option<u8>,
    pub l4s_queue_type: Option<L4sQueueType>,
    pub service_class: Option<ServiceClass>,
    /// DSCP written to the session's packets.
    pub dscp: u8,
    /// Value written to `skb->priority` instead of the band's class (for interfaces whose
    /// queueing the operator owns).
    pub skb_priority: Option<u32>,
    pub band: Band,
}

impl QosProfile {
    /// The band a profile implies when it names none: a target minimum rate means guaranteed;
    /// a delay budget of 20 ms or less, or an interactive service class, means low latency.
    pub fn implied_band(&self) -> Band {
        let interactive = matches!(
            self.service_class,
            Some(
                ServiceClass::MicrosoftVoice
                    | ServiceClass::MicrosoftAudioVideo
                    | ServiceClass::RealTimeInteractive
            )
        );
        let tight = self
            .packet_delay_budget
            .is_some_and(|d| d.as_duration() <= Duration::from_millis(20));
        if self.target_min_upstream_rate.is_some() || self.target_min_downstream_rate.is_some() {
            Band::Guaranteed
        } else if interactive || tight {
            Band::LowLatency
        } else {
            Band::BestEffort
        }
    }

    /// Longest session this profile allows, in whole seconds (`None`: no limit).
    pub fn max_duration_secs(&self) -> Option<u64> {
        self.max_duration.map(|d| d.as_duration().as_secs())
    }

    /// Shortest session this profile allows, rounded up to whole seconds.
    pub fn min_duration_secs(&self) -> u64 {
        self.min_duration.map_or(1, |d| {
            let d = d.as_duration();
            d.as_secs() + u64::from(d.subsec_nanos() > 0)
        })
    }
}

/// The node's profiles by name.
#[derive(Clone, Debug, Default)]
pub struct Profiles(BTreeMap<ProfileName, QosProfile>);

impl Profiles {
    pub fn new(profiles: impl IntoIterator<Item = QosProfile>) -> Self {
        Self(profiles.into_iter().map(|p| (p.name.clone(), p)).collect())
    }

    pub fn get(&self, name: &ProfileName) -> Option<&QosProfile> {
        self.0.get(name)
    }

    /// The name as these profiles hold it (a clone of it shares its text).
    pub fn name(&self, name: &ProfileName) -> Option<&ProfileName> {
        self.0.get_key_value(name).map(|(k, _)| k)
    }

    pub fn iter(&self) -> impl Iterator<Item = &QosProfile> {
        self.0.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_convert() {
        assert_eq!(
            Rate {
                value: 500,
                unit: RateUnit::Kbps
            }
            .bits_per_second(),
            500_000
        );
        let d = CamaraDuration {
            value: 2,
            unit: TimeUnit::Hours,
        };
        assert_eq!(d.as_duration(), Duration::from_secs(7200));
    }

    #[test]
    fn service_classes_follow_the_camara_dscp_table() {
        assert_eq!(ServiceClass::RealTimeInteractive.dscp(), 32);
        assert_eq!(ServiceClass::MultimediaStreaming.dscp(), 26);
        assert_eq!(ServiceClass::Standard.dscp(), 0);
    }
}
