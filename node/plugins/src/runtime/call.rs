//! The call ABI: encoding a call's input (MessagePack), passing it through the guest's buffer
//! or allocator, and decoding what the module answers.

use super::*;

/// What a call is about.
pub struct CallInput<'a> {
    pub event: &'a EventRecord,
    /// The event's effective time (what `now_ms` returns).
    pub time_ms: i64,
    /// The rule's `plugin.config`, MessagePack-encoded.
    pub config: &'a [u8],
    pub rule_id: uuid::Uuid,
    pub rule_version: u32,
}

/// Writes `input` into a buffer the module allocates; returns its address.
pub(super) fn write_input(live: &mut Live, input: &[u8]) -> wasmtime::Result<i32> {
    let len = i32::try_from(input.len()).map_err(|_| wasmtime::Error::msg("input too large"))?;
    let ptr = live.alloc.call(&mut live.store, len)?;
    live.memory
        .write(&mut live.store, ptr as u32 as usize, input)
        .map_err(|_| wasmtime::Error::msg(format!("signalops_alloc returned an out-of-bounds buffer {ptr}+{len}")))?;
    Ok(ptr)
}

/// One call with the whole input in a buffer (ABI v1 `evaluate`, `render`); the output's bytes.
pub(super) fn call_buffer<'a>(live: &'a mut Live, input: &[u8], limits: Limits) -> Result<&'a [u8], Failure> {
    let run = (|| -> wasmtime::Result<i64> {
        live.store.set_fuel(limits.fuel_per_call)?;
        let ptr = write_input(live, input)?;
        let Entry::Buffer(entry) = &live.entry else {
            return Err(wasmtime::Error::msg("the module's entry point takes no input buffer"));
        };
        entry.call(&mut live.store, (ptr, input.len() as i32))
    })();
    match run {
        Ok(packed) => output(live, packed, limits),
        Err(e) => Err(classify(&e, live.store.data().memory_denied)),
    }
}

/// One ABI v2 `evaluate(slot)`: the rule's slot is configured first if this instance has not
/// seen the rule (or its version or config changed). The output's bytes.
pub(super) fn call_slot<'a>(
    live: &'a mut Live,
    input: &CallInput<'_>,
    buf: &mut Vec<u8>,
    limits: Limits,
) -> Result<&'a [u8], Failure> {
    let run = (|| -> wasmtime::Result<Result<i64, Failure>> {
        live.store.set_fuel(limits.fuel_per_call)?;
        let Entry::Slots { slots, .. } = &live.entry else {
            return Err(wasmtime::Error::msg("the module is not an ABI v2 rule plugin"));
        };
        let known = slots.get(&input.rule_id);
        let current = known.filter(|s| s.version == input.rule_version && s.config == input.config).map(|s| s.index);
        let slot = match current {
            Some(slot) => slot,
            None => {
                let index = known.map_or(slots.len() as i32, |s| s.index);
                encode_rule(buf, input);
                let ptr = write_input(live, buf)?;
                let Entry::Slots { configure, slots, .. } = &mut live.entry else {
                    return Err(wasmtime::Error::msg("the module is not an ABI v2 rule plugin"));
                };
                let code = configure.call(&mut live.store, (index, ptr, buf.len() as i32))?;
                if code != 0 {
                    return Ok(Err(failure(
                        FailureKind::BadOutput,
                        format!("`signalops_configure` returned {code} for the rule's config"),
                    )));
                }
                let slot = Slot { index, version: input.rule_version, config: input.config.to_vec() };
                slots.insert(input.rule_id, slot);
                index
            }
        };
        let Entry::Slots { evaluate, .. } = &live.entry else {
            return Err(wasmtime::Error::msg("the module is not an ABI v2 rule plugin"));
        };
        Ok(Ok(evaluate.call(&mut live.store, slot)?))
    })();
    match run {
        Ok(Ok(packed)) => output(live, packed, limits),
        Ok(Err(f)) => Err(f),
        Err(e) => Err(classify(&e, live.store.data().memory_denied)),
    }
}

/// The output a call returned as `(ptr << 32) | len`, checked against the limit and the memory.
pub(super) fn output(live: &Live, packed: i64, limits: Limits) -> Result<&[u8], Failure> {
    let ptr = (packed as u64 >> 32) as usize;
    let len = (packed as u64 & 0xffff_ffff) as usize;
    if len > limits.max_output_bytes {
        return Err(failure(
            FailureKind::BadOutput,
            format!("output is {len} bytes; the limit is {}", limits.max_output_bytes),
        ));
    }
    let data = live.memory.data(&live.store);
    ptr.checked_add(len)
        .and_then(|end| data.get(ptr..end))
        .ok_or_else(|| failure(FailureKind::BadOutput, format!("output {ptr}+{len} is outside the module's memory")))
}

/// The HTTP request a notifier plugin rendered (checked by the sender before it goes out).
#[derive(Debug, Clone, PartialEq)]
pub struct PluginRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A body given as MessagePack bin or str.
#[derive(Default)]
pub(super) struct RawBody(pub(super) Vec<u8>);

impl<'de> Deserialize<'de> for RawBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawBody, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawBody;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes or a string")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<RawBody, E> {
                Ok(RawBody(v.to_vec()))
            }
            fn visit_str<E>(self, v: &str) -> Result<RawBody, E> {
                Ok(RawBody(v.as_bytes().to_vec()))
            }
            fn visit_unit<E>(self) -> Result<RawBody, E> {
                Ok(RawBody::default())
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
pub(super) struct RawRequest {
    pub(super) method: Option<String>,
    pub(super) url: Option<String>,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) body: RawBody,
    pub(super) error: Option<String>,
}

/// Reads a notifier's output map: `{"method", "url", "headers", "body"}` or `{"error"}`.
pub fn decode_request(bytes: &[u8]) -> Result<PluginRequest, Failure> {
    let raw: RawRequest = rmp_serde::from_slice(bytes)
        .map_err(|e| failure(FailureKind::BadOutput, format!("output is not an ABI v1 request map: {e}")))?;
    if let Some(msg) = raw.error {
        return Err(failure(FailureKind::PluginError, msg));
    }
    let url = raw.url.ok_or_else(|| failure(FailureKind::BadOutput, "output has no `url`"))?;
    Ok(PluginRequest {
        method: raw.method.unwrap_or_else(|| "POST".into()).to_ascii_uppercase(),
        url,
        headers: raw.headers.into_iter().collect(),
        body: raw.body.0,
    })
}

/// Reads a rule's output map (the same in ABI v1 and v2).
pub fn decode_output(bytes: &[u8]) -> Result<Decision, Failure> {
    // Most calls decide not to fire, and say so in exactly these bytes (what the SDK writes for
    // `Decision::skip()`): `{"fire": false}` / `{"fire": true}`.
    if let [0x81, 0xa4, b'f', b'i', b'r', b'e', b @ (0xc2 | 0xc3)] = bytes {
        return Ok(Decision {
            fire: *b == 0xc3,
            severity: None,
            title: None,
            labels: BTreeMap::new(),
            fields: Fields::default(),
        });
    }
    let out = read_output(bytes)
        .map_err(|e| failure(FailureKind::BadOutput, format!("output is not a decision map: {e}")))?;
    if let Some(msg) = out.error {
        return Err(failure(FailureKind::PluginError, msg));
    }
    let fire = out.fire.ok_or_else(|| failure(FailureKind::BadOutput, "output has no `fire`"))?;
    Ok(Decision { fire, severity: out.severity, title: out.title, labels: out.labels, fields: out.fields })
}

/// Writes the ABI v1 input map.
pub(super) fn encode_input(buf: &mut Vec<u8>, input: &CallInput<'_>) {
    use rmp::encode as w;
    buf.clear();
    // Writing into a Vec cannot fail.
    let _ = w::write_map_len(buf, 4);
    let _ = w::write_str(buf, "abi");
    let _ = w::write_uint(buf, Abi::V1.number() as u64);
    let _ = w::write_str(buf, "event");
    guest_event::encode_event(buf, input.event);
    write_rule_members(buf, input);
}

/// Writes the input of ABI v2 `signalops_configure`: `{"abi", "config", "rule"}`.
pub(super) fn encode_rule(buf: &mut Vec<u8>, input: &CallInput<'_>) {
    use rmp::encode as w;
    buf.clear();
    let _ = w::write_map_len(buf, 3);
    let _ = w::write_str(buf, "abi");
    let _ = w::write_uint(buf, Abi::V2.number() as u64);
    write_rule_members(buf, input);
}

/// The `config` and `rule` members of a rule's input.
pub(super) fn write_rule_members(buf: &mut Vec<u8>, input: &CallInput<'_>) {
    use rmp::encode as w;
    let mut uuid_text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let _ = w::write_str(buf, "config");
    buf.extend_from_slice(input.config);
    let _ = w::write_str(buf, "rule");
    let _ = w::write_map_len(buf, 2);
    let _ = w::write_str(buf, "id");
    let _ = w::write_str(buf, input.rule_id.hyphenated().encode_lower(&mut uuid_text));
    let _ = w::write_str(buf, "version");
    let _ = w::write_uint(buf, input.rule_version as u64);
}

/// Encodes a rule's `plugin.config` once, when the rule is compiled.
pub fn encode_config(config: &Value) -> Arc<[u8]> {
    rmp_serde::to_vec(config).unwrap_or_else(|_| vec![0x80]).into()
}
