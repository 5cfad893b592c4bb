//! `qodctl top`: a live terminal view of the node's AVAILABLE sessions (scope `qod:admin`, and
//! `qos-profiles:read` for the granted rates): the rate each carries per direction now, against
//! its profile's maximum, and its policer drops. Sessions are read every `--interval` through
//! `ListSessions`; a rate is the change of the session's byte counters over the interval.
//! `q` or Esc quits.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use qod_proto::v1::{
    self as pb, qod_node_client::QodNodeClient, qos_profiles_client::QosProfilesClient,
};
use ratatui::{
    crossterm::event::{self, Event, KeyCode},
    layout::Constraint,
    style::{Modifier, Style},
    widgets::{Block, Row, Table},
};

type Channel = qod_proto::client::QodChannel;

/// Counters of one session at one poll.
#[derive(Clone, Copy)]
struct Seen {
    at: Instant,
    up_bytes: u64,
    down_bytes: u64,
}

struct Line {
    id: String,
    client: String,
    profile: String,
    up_bps: f64,
    down_bps: f64,
    max_up: String,
    max_down: String,
    drops: u64,
}

/// Every AVAILABLE session, all pages.
async fn all_sessions(node: &mut QodNodeClient<Channel>) -> anyhow::Result<Vec<pb::NodeSession>> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = node
            .list_sessions(pb::ListSessionsRequest {
                status: "AVAILABLE".into(),
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(r.sessions);
        if r.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = r.next_page_token;
    }
}

fn kbit(bps: f64) -> String {
    format!("{:.0}", bps / 1000.0)
}

pub async fn run(channel: Channel, interval: Duration) -> anyhow::Result<()> {
    let mut node = QodNodeClient::new(channel.clone());
    // Granted rates by profile, when the token may read profiles.
    let profiles: HashMap<String, (String, String)> = QosProfilesClient::new(channel)
        .retrieve_qos_profiles(pb::RetrieveQosProfilesRequest::default())
        .await
        .map(|r| {
            r.into_inner()
                .profiles
                .into_iter()
                .map(|p| {
                    (
                        p.name.clone(),
                        (
                            super::rate(p.max_upstream_rate.as_ref()),
                            super::rate(p.max_downstream_rate.as_ref()),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    // The first read fails here, before the terminal is taken over.
    let mut sessions = all_sessions(&mut node).await.context("list the sessions")?;
    let mut terminal = ratatui::init();
    let mut last: HashMap<String, Seen> = HashMap::new();
    let result = loop {
        let now = Instant::now();
        let mut lines: Vec<Line> = sessions
            .iter()
            .filter_map(|n| {
                let s = n.session.as_ref()?;
                let c = s.counters.unwrap_or_default();
                let seen = Seen {
                    at: now,
                    up_bytes: c.uplink_bytes,
                    down_bytes: c.downlink_bytes,
                };
                let rate = |before: u64, after: u64, dt: f64| {
                    if dt > 0.0 {
                        after.saturating_sub(before) as f64 * 8.0 / dt
                    } else {
                        0.0
                    }
                };
                let (up_bps, down_bps) = last.get(&s.session_id).map_or((0.0, 0.0), |b| {
                    let dt = now.duration_since(b.at).as_secs_f64();
                    (
                        rate(b.up_bytes, seen.up_bytes, dt),
                        rate(b.down_bytes, seen.down_bytes, dt),
                    )
                });
                last.insert(s.session_id.clone(), seen);
                let (max_up, max_down) = profiles.get(&s.qos_profile).cloned().unwrap_or_default();
                Some(Line {
                    id: s.session_id.clone(),
                    client: n.client.clone(),
                    profile: s.qos_profile.clone(),
                    up_bps,
                    down_bps,
                    max_up,
                    max_down,
                    drops: c.uplink_dropped + c.downlink_dropped,
                })
            })
            .collect();
        lines.sort_by(|a, b| (b.up_bps + b.down_bps).total_cmp(&(a.up_bps + a.down_bps)));
        let rows: Vec<Row> = lines
            .iter()
            .map(|l| {
                Row::new(vec![
                    l.id.clone(),
                    l.client.clone(),
                    l.profile.clone(),
                    kbit(l.up_bps),
                    l.max_up.clone(),
                    kbit(l.down_bps),
                    l.max_down.clone(),
                    l.drops.to_string(),
                ])
            })
            .collect();
        let title = format!(
            " qodctl top: {} AVAILABLE sessions, every {:?} (q quits) ",
            lines.len(),
            interval
        );
        let drawn = terminal.draw(|frame| {
            let table = Table::new(
                rows,
                [
                    Constraint::Length(36),
                    Constraint::Length(14),
                    Constraint::Length(10),
                    Constraint::Length(11),
                    Constraint::Length(10),
                    Constraint::Length(11),
                    Constraint::Length(10),
                    Constraint::Length(8),
                ],
            )
            .header(
                Row::new(vec![
                    "SESSION",
                    "CLIENT",
                    "PROFILE",
                    "UP kbit/s",
                    "MAX UP",
                    "DOWN kbit/s",
                    "MAX DOWN",
                    "DROPS",
                ])
                .style(Style::default().add_modifier(Modifier::BOLD)),
            )
            .block(Block::bordered().title(title));
            frame.render_widget(table, frame.area());
        });
        if let Err(e) = drawn {
            break Err(e.into());
        }
        let deadline = Instant::now() + interval;
        let mut quit = false;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match event::poll(left) {
                Ok(true) => {
                    if let Ok(Event::Key(k)) = event::read()
                        && matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                    {
                        quit = true;
                        break;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    ratatui::restore();
                    return Err(e.into());
                }
            }
        }
        if quit {
            break Ok(());
        }
        match all_sessions(&mut node).await {
            Ok(s) => sessions = s,
            Err(e) => break Err(e),
        }
    };
    ratatui::restore();
    result
}
