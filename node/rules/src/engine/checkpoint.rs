//! The checkpoint codec: what [`Engine::take_effects`] writes of the engine's state (per rule and
//! group, per class group and lane, plugin entries) and how [`Engine::restore`] reads it back,
//! older layouts included.

use super::*;

/// Size of the buffers checkpoint entries are encoded into.
pub(super) const CHECKPOINT_CHUNK: usize = 1 << 20;

/// A shared group as checkpoints hold it, positionally:
/// `[seconds, values, ids, idxs, dvals, lanes]`. `ids` are the event ids the lanes' samples
/// name (each once), `idxs` the timeline's bucket indexes and `dvals` its distinct values
/// (hashes). Each started lane is
/// `[rule, head_ms, buckets, distinct, recent, pending_since_ms, open, last_fired_ms]`:
/// `buckets` its non-empty buckets by position in `idxs`, `distinct` per value of `dvals` the
/// age in buckets of its newest sighting before the lane's head bucket (or nil), or, when an
/// earlier lane's column is the same, that lane's position in `lanes`; `recent` positions in
/// `ids`, and `open` the open alert's named MessagePack encoding.
pub(super) struct GroupEntry<'a> {
    pub(super) group: &'a SharedGroup,
    pub(super) class: &'a ClassState,
}

impl Serialize for GroupEntry<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeTuple};
        let (g, tl) = (self.group, &self.group.timeline);
        let mut t = s.serialize_tuple(6)?;
        t.serialize_element(&self.class.seconds)?;
        t.serialize_element(&g.values)?;
        t.serialize_element(&g.ids.slots.iter().map(|(id, _)| id).collect::<Vec<_>>())?;
        t.serialize_element(tl.stored_idxs())?;
        t.serialize_element(&tl.stored_values())?;
        let mut lanes = Vec::with_capacity(g.lanes.len());
        // Lanes that count the same values see the same sightings (same field, same or no
        // filter): such a lane refers to the earlier lane's column instead of repeating it.
        let mut columns: Vec<(usize, Vec<Option<u32>>)> = Vec::new();
        for (lane, (l, rule)) in g.lanes.iter().zip(&self.class.rule_ids).enumerate() {
            if !tl.is_started(lane) {
                continue;
            }
            let mut ages = Vec::new();
            tl.stored_distinct(lane, &mut ages);
            let distinct = match columns.iter().find(|(_, c)| !ages.is_empty() && *c == ages) {
                Some((at, _)) => DistinctColumn::Same(*at as u32),
                None if ages.is_empty() => DistinctColumn::Ages(Vec::new()),
                None => {
                    columns.push((lanes.len(), ages.clone()));
                    DistinctColumn::Ages(ages)
                }
            };
            let recent: Vec<u32> = l.recent.iter().collect();
            let open = match &l.open {
                Some(a) => Some(Bin(rmp_serde::to_vec_named(&**a).map_err(S::Error::custom)?)),
                None => None,
            };
            lanes.push((
                rule,
                tl.head(lane),
                tl.stored_buckets(lane),
                distinct,
                recent,
                l.pending_since_ms,
                open,
                l.last_fired_ms,
            ));
        }
        t.serialize_element(&lanes)?;
        t.end()
    }
}

/// A lane's distinct sightings in a stored shared group (see [`GroupEntry`]).
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum DistinctColumn {
    /// The same as the column of the stored lane at this position.
    Same(u32),
    Ages(Vec<Option<u32>>),
}

/// Bytes as MessagePack `bin`.
#[derive(Debug)]
pub(super) struct Bin(pub(super) Vec<u8>);

impl Serialize for Bin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Bin;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bin, E> {
                Ok(Bin(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bin, E> {
                Ok(Bin(v))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A stored shared group (see [`GroupEntry`]).
#[derive(Deserialize)]
pub(super) struct StoredGroup {
    pub(super) seconds: u64,
    pub(super) values: Vec<Value>,
    pub(super) ids: Vec<Option<Arc<str>>>,
    pub(super) idxs: Vec<i64>,
    pub(super) dvals: Vec<u64>,
    pub(super) lanes: Vec<StoredLane>,
}

#[derive(Deserialize)]
pub(super) struct StoredLane(
    pub(super) Uuid,
    pub(super) i64,
    pub(super) Vec<Bucket>,
    pub(super) DistinctColumn,
    pub(super) Vec<u32>,
    pub(super) Option<i64>,
    pub(super) Option<Bin>,
    pub(super) Option<i64>,
);

impl Engine {
    /// Rebuilds an engine from its last checkpoint. Processing resumes after `meta.state_seq`;
    /// positions up to `meta.effects_seq` are re-evaluated without re-emitting increments.
    pub fn restore(
        partition: u32,
        cfg: EngineConfig,
        meta: EngineMeta,
        entries: impl IntoIterator<Item = (StateKey, impl AsRef<[u8]> + Into<Vec<u8>>)>,
    ) -> Result<Engine, RestoreError> {
        let mut e = Engine::new(partition, cfg);
        e.processed_seq = meta.state_seq;
        e.committed_seq = meta.effects_seq;
        e.state_seq = meta.state_seq;
        e.clock_ms = meta.clock_ms;
        for (k, bytes) in entries {
            let rule = k.rule;
            let bad = |source: Box<dyn std::error::Error + Send + Sync>| RestoreError { rule, source };
            if let Some(g) = k.group.as_deref().filter(|g| g.starts_with(CLASS_GROUP)) {
                // A shared group: each lane goes back to its rule until the rules are known.
                let stored: StoredGroup = rmp_serde::from_slice(bytes.as_ref()).map_err(|e| bad(e.into()))?;
                let key = g[CLASS_GROUP.len()..].to_string();
                let id = group_id(&key);
                let ts = e.tenants.entry(k.tenant).or_default();
                let mut columns: Vec<Vec<Option<u32>>> = Vec::with_capacity(stored.lanes.len());
                for lane in stored.lanes {
                    let StoredLane(lane_rule, head_ms, buckets, column, recent, pending_since_ms, open, last_fired_ms) =
                        lane;
                    let distinct = match column {
                        DistinctColumn::Ages(ages) => ages,
                        DistinctColumn::Same(at) => columns.get(at as usize).cloned().unwrap_or_default(),
                    };
                    columns.push(distinct.clone());
                    let window =
                        window_from_stored(stored.seconds, head_ms, &stored.idxs, &stored.dvals, buckets, &distinct);
                    let open = match open {
                        Some(Bin(b)) => Some(rmp_serde::from_slice(&b).map_err(|e| bad(e.into()))?),
                        None => None,
                    };
                    let state = GroupState {
                        key: key.clone(),
                        id,
                        values: stored.values.clone(),
                        head_ms,
                        window: Some(window),
                        last_seen_ms: None,
                        recent: recent.iter().filter_map(|&i| stored.ids.get(i as usize).cloned().flatten()).collect(),
                        pending_since_ms,
                        open,
                        last_fired_ms,
                        dirty: false,
                        alert_dirty: false,
                    };
                    ts.rules.entry(lane_rule).or_default().groups.insert(id, Box::new(state));
                }
                ts.restored.push(k);
                continue;
            }
            let rs = e.tenants.entry(k.tenant).or_default().rules.entry(k.rule).or_default();
            match k.group {
                None => rs.meta = rmp_serde::from_slice(bytes.as_ref()).map_err(|e| bad(e.into()))?,
                Some(g) if g.starts_with(PLUGIN_WINDOW) => {
                    let key = hex::decode(&g[PLUGIN_WINDOW.len()..]).map_err(|e| bad(e.into()))?;
                    let c: Counter = rmp_serde::from_slice(bytes.as_ref()).map_err(|e| bad(e.into()))?;
                    rs.plugin.restore_window(key, c);
                }
                Some(g) if g.starts_with(PLUGIN_STATE) => {
                    let key = hex::decode(&g[PLUGIN_STATE.len()..]).map_err(|e| bad(e.into()))?;
                    rs.plugin.kv.insert(key, bytes.into());
                }
                Some(g) => {
                    let mut gs: GroupState = rmp_serde::from_slice(bytes.as_ref()).map_err(|e| bad(e.into()))?;
                    gs.id = group_id(&g);
                    gs.key = g;
                    // A window group stored per rule (before window classes existed).
                    let legacy = gs.window.is_some().then(|| StateKey { group: Some(gs.key.clone()), ..k });
                    rs.groups.insert(gs.id, Box::new(gs));
                    if let Some(key) = legacy {
                        e.tenants.entry(key.tenant).or_default().restored.push(key);
                    }
                }
            }
        }
        Ok(e)
    }

    /// Takes what was emitted since the last call. With `checkpoint`, also the state that
    /// changed, and the returned meta says the stored state now reflects `processed_seq`.
    pub fn take_effects(&mut self, checkpoint: bool) -> PartitionEffects {
        if let Some(p) = &mut self.plugins {
            if let Some(stats) = &p.stats {
                p.pending.flush(stats);
            }
        }
        let out = &mut self.out;
        for (tenant, rule, group) in out.alert_dirty.drain(..) {
            let g = self
                .tenants
                .get_mut(&tenant)
                .and_then(|t| t.rules.get_mut(&rule))
                .and_then(|r| r.groups.get_mut(&group));
            if let Some(g) = g {
                g.alert_dirty = false;
                refresh_event_ids(g);
                if let Some(open) = &g.open {
                    out.alerts.push(open.clone());
                }
            }
        }
        metrics::counter!(telemetry::ALERTS_FIRED).increment(std::mem::take(&mut out.fired));
        metrics::counter!(telemetry::ALERTS_RESOLVED).increment(std::mem::take(&mut out.resolved));
        metrics::counter!(telemetry::RULE_LATE_EVENTS).increment(std::mem::take(&mut out.late));
        metrics::counter!(telemetry::RULE_GROUPS_DROPPED).increment(std::mem::take(&mut out.dropped_groups));
        let mut effects = PartitionEffects {
            partition: self.partition,
            epoch: 0,
            meta: EngineMeta {
                effects_seq: self.processed_seq.max(self.committed_seq),
                state_seq: self.state_seq,
                clock_ms: self.clock_ms,
            },
            alerts: std::mem::take(&mut out.alerts),
            transitions: std::mem::take(&mut out.transitions),
            series: out
                .series
                .drain()
                .map(|((tenant, event_type, minute), point)| SeriesDelta { tenant, event_type, minute, point })
                .collect(),
            catalog: out
                .catalog
                .drain()
                .map(|((tenant, event_type), entry)| CatalogDelta { tenant, event_type, entry })
                .collect(),
            checkpoint: None,
        };
        if checkpoint {
            let mut cp = StateCheckpoint {
                puts: Vec::with_capacity(out.state_dirty.len()),
                deletes: std::mem::take(&mut out.deletes),
            };
            // Encoded back to back into large buffers that the entries then share.
            let mut buf = bytes::BytesMut::with_capacity(CHECKPOINT_CHUNK);
            for key in out.state_dirty.drain(..) {
                let Some(ts) = self.tenants.get_mut(&key.tenant) else { continue };
                if buf.capacity() < CHECKPOINT_CHUNK / 16 {
                    buf.reserve(CHECKPOINT_CHUNK);
                }
                let mut w = (&mut buf).writer();
                let encoded = match key.group.as_deref() {
                    Some(g) if g.starts_with(CLASS_GROUP) => {
                        let gid = group_id(&g[CLASS_GROUP.len()..]);
                        let Some(cs) = ts.classes.iter_mut().find(|c| c.id == key.rule) else { continue };
                        match cs.groups.get_mut(&gid) {
                            Some(sg) if sg.dirty => sg.dirty = false,
                            _ => continue,
                        }
                        let cs = &*cs;
                        let Some(sg) = cs.groups.get(&gid) else { continue };
                        let entry = GroupEntry { group: sg, class: cs };
                        rmp_serde::encode::write(&mut w, &entry)
                    }
                    group => {
                        let Some(rs) = ts.rules.get_mut(&key.rule) else { continue };
                        match group {
                            None => {
                                rs.meta_dirty = false;
                                rmp_serde::encode::write_named(&mut w, &rs.meta)
                            }
                            Some(g) => match rs.groups.get_mut(&group_id(g)) {
                                Some(gs) => {
                                    gs.dirty = false;
                                    rmp_serde::encode::write_named(&mut w, &**gs)
                                }
                                None => continue,
                            },
                        }
                    }
                };
                let bytes = buf.split().freeze();
                match encoded {
                    Ok(()) => cp.puts.push((key, bytes)),
                    Err(e) => {
                        tracing::error!(rule_id = %key.rule, error = %e, "cannot encode rule state; it will be rebuilt")
                    }
                }
            }
            for (tenant, ts) in self.tenants.iter_mut() {
                for (rule, rs) in ts.rules.iter_mut() {
                    for k in rs.plugin.take_dirty() {
                        let group = Some(plugin_entry_group(&k));
                        let key = StateKey { tenant: *tenant, rule: *rule, group };
                        let bytes = match &k {
                            EntryKey::Window(w) => {
                                rs.plugin.windows.get(w).map(|c| rmp_serde::to_vec_named(c).map(bytes::Bytes::from))
                            }
                            EntryKey::State(s) => rs.plugin.kv.get(s).map(|v| Ok(bytes::Bytes::copy_from_slice(v))),
                        };
                        match bytes {
                            Some(Ok(b)) => cp.puts.push((key, b)),
                            None => cp.deletes.push(key),
                            Some(Err(e)) => {
                                tracing::error!(rule_id = %rule, error = %e, "cannot encode plugin state")
                            }
                        }
                    }
                }
            }
            self.state_seq = self.processed_seq;
            effects.meta.state_seq = self.processed_seq;
            effects.checkpoint = Some(cp);
            self.since_checkpoint = 0;
        }
        effects
    }
}
