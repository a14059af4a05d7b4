//! Upload validation: the ABI versions and the imports and exports each allows, and compiling an
//! uploaded module after checking its interface against them (never a precompiled artifact).

use super::*;

/// The ABI versions this node runs (see `sdk/ABI.md`). A module's version is the marker it
/// exports (`signalops_abi_v2` or `signalops_abi_v1`); its imports come from that version's
/// namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abi {
    /// The whole event and the rule's config encoded into every call's input.
    V1,
    /// Each rule's config handed over once per instance (`signalops_configure`); the event
    /// read through host functions, only the fields the plugin asks for.
    V2,
}

impl Abi {
    pub fn number(self) -> i32 {
        match self {
            Abi::V1 => 1,
            Abi::V2 => 2,
        }
    }

    /// The import namespace.
    pub fn namespace(self) -> &'static str {
        match self {
            Abi::V1 => "signalops_v1",
            Abi::V2 => "signalops_v2",
        }
    }

    /// The export that marks the version (returns [`Abi::number`]).
    pub fn marker(self) -> &'static str {
        match self {
            Abi::V1 => "signalops_abi_v1",
            Abi::V2 => "signalops_abi_v2",
        }
    }

    /// A module's version, by its marker export (a module without one is checked as v1, so
    /// the missing marker is what the upload reports).
    pub fn of(module: &Module) -> Abi {
        match module.get_export(Abi::V2.marker()) {
            Some(_) => Abi::V2,
            None => Abi::V1,
        }
    }

    /// Host functions: name, parameter types, result types (`i` = i32, `I` = i64, `F` = f64).
    pub(super) fn imports(self) -> impl Iterator<Item = &'static (&'static str, &'static str, &'static str)> {
        let extra: &[_] = match self {
            Abi::V1 => &[],
            Abi::V2 => EVENT_IMPORTS,
        };
        IMPORTS.iter().chain(extra)
    }

    /// The exports a module of this version and kind must have: name, parameters, results.
    pub(super) fn exports(self, kind: PluginKind) -> &'static [(&'static str, &'static str, &'static str)] {
        match (self, kind) {
            (Abi::V1, PluginKind::Rule) => {
                &[("signalops_abi_v1", "", "i"), ("signalops_alloc", "i", "i"), ("evaluate", "ii", "I")]
            }
            (Abi::V1, PluginKind::Notifier) => {
                &[("signalops_abi_v1", "", "i"), ("signalops_alloc", "i", "i"), ("render", "ii", "I")]
            }
            (Abi::V2, PluginKind::Rule) => &[
                ("signalops_abi_v2", "", "i"),
                ("signalops_alloc", "i", "i"),
                ("signalops_configure", "iii", "i"),
                ("evaluate", "i", "I"),
            ],
            (Abi::V2, PluginKind::Notifier) => {
                &[("signalops_abi_v2", "", "i"), ("signalops_alloc", "i", "i"), ("render", "ii", "I")]
            }
        }
    }
}

/// Host functions of every ABI version.
pub(super) const IMPORTS: &[(&str, &str, &str)] = &[
    ("log", "iii", ""),
    ("now_ms", "", "I"),
    ("window_add", "iiiI", "I"),
    ("window_sum", "iii", "I"),
    ("state_get", "iiii", "i"),
    ("state_set", "iiii", "i"),
    ("state_delete", "ii", "i"),
];

/// Host functions added by ABI v2: the event, read by path, and whether the rule's alert for
/// the event's group is open.
pub(super) const EVENT_IMPORTS: &[(&str, &str, &str)] =
    &[("event_get", "iiii", "i"), ("event_number", "ii", "F"), ("alert_open", "", "i")];

/// What a module is, by its entry point: `evaluate` makes a rule plugin, `render` a notifier.
pub fn kind_of(module: &Module) -> Option<PluginKind> {
    match (module.get_export("evaluate").is_some(), module.get_export("render").is_some()) {
        (true, false) => Some(PluginKind::Rule),
        (false, true) => Some(PluginKind::Notifier),
        _ => None,
    }
}

/// Why an uploaded module was refused. `status` is the HTTP status to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: &'static str,
    pub detail: String,
}

impl Rejection {
    pub(super) fn new(status: u16, reason: &'static str, detail: impl Into<String>) -> Rejection {
        Rejection { status, reason, detail: detail.into() }
    }
}

/// A module that passed validation.
#[derive(Debug, Clone)]
pub struct Validated {
    pub digest: Digest,
    pub module: Module,
    pub kind: PluginKind,
}

/// Checks imports and exports against the module's ABI version; the entry point decides the
/// module's kind.
pub(super) fn check_interface(module: &Module) -> Result<PluginKind, Rejection> {
    let abi = Abi::of(module);
    let ns = abi.namespace();
    for imp in module.imports() {
        let what = format!("{}.{}", imp.module(), imp.name());
        if imp.module() != ns {
            return Err(Rejection::new(
                422,
                "forbidden_import",
                format!("the module imports `{what}`; plugins of ABI v{} may import only from `{ns}` (no WASI, no host access)", abi.number()),
            ));
        }
        let Some((_, p, r)) = abi.imports().find(|(n, _, _)| *n == imp.name()) else {
            return Err(Rejection::new(
                422,
                "forbidden_import",
                format!("`{what}` is not a host function of ABI v{}", abi.number()),
            ));
        };
        let ExternType::Func(ft) = imp.ty() else {
            return Err(Rejection::new(422, "forbidden_import", format!("`{what}` must be imported as a function")));
        };
        if sig(ft.params(), ft.results()) != (p.to_string(), r.to_string()) {
            return Err(Rejection::new(
                422,
                "import_signature",
                format!("`{what}` is imported with the wrong signature"),
            ));
        }
    }
    match module.get_export("memory") {
        Some(ExternType::Memory(m)) if !m.is_64() => {}
        _ => {
            return Err(Rejection::new(
                422,
                "missing_export",
                "the module must export its 32-bit linear memory as `memory`",
            ))
        }
    }
    let Some(kind) = kind_of(module) else {
        return Err(Rejection::new(
            422,
            "missing_export",
            "the module must export exactly one entry point: `evaluate` (a rule plugin, built with `export_rule!`) or `render` (a notifier, built with `export_notifier!`)",
        ));
    };
    for (name, p, r) in abi.exports(kind) {
        match module.get_export(name) {
            Some(ExternType::Func(ft)) if sig(ft.params(), ft.results()) == (p.to_string(), r.to_string()) => {}
            Some(_) => {
                return Err(Rejection::new(422, "export_signature", format!("the export `{name}` has the wrong type")))
            }
            None => {
                return Err(Rejection::new(
                    422,
                    "missing_export",
                    format!(
                        "the module does not export `{name}` (built without `export_rule!` or `export_notifier!`?)"
                    ),
                ))
            }
        }
    }
    Ok(kind)
}

pub(super) fn sig(params: impl Iterator<Item = ValType>, results: impl Iterator<Item = ValType>) -> (String, String) {
    let code = |t: ValType| match t {
        ValType::I32 => 'i',
        ValType::I64 => 'I',
        ValType::F32 => 'f',
        ValType::F64 => 'F',
        _ => '?',
    };
    (params.map(code).collect(), results.map(code).collect())
}

impl PluginRuntime {
    /// Validates and compiles a module (CPU-heavy: call from a blocking thread), checks its
    /// ABI by instantiating it once, and caches the compiled module.
    pub fn compile(&self, bytes: &[u8]) -> Result<Validated, Rejection> {
        use sha2::Digest as _;
        if bytes.len() > self.limits.max_module_bytes {
            return Err(Rejection::new(
                413,
                "module_too_large",
                format!("the module is {} bytes; the limit is {}", bytes.len(), self.limits.max_module_bytes),
            ));
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(Rejection::new(
                400,
                "not_wasm",
                "the body is not a WebAssembly binary module (no \\0asm header)",
            ));
        }
        let digest: Digest = sha2::Sha256::digest(bytes).into();
        if let Some(module) = self.module(&digest) {
            let kind = check_interface(&module)?;
            return Ok(Validated { digest, module, kind });
        }
        let module = Module::new(&self.engine, bytes).map_err(|e| {
            let e = format!("{e:#}");
            // The instance pool checks a module's declared memory and tables against its
            // slots when it compiles (the wasmtime version is pinned; a test covers the text).
            if e.contains("pooling allocator") {
                Rejection::new(
                    422,
                    "instantiation_failed",
                    format!("the module needs more than a plugin may have: {e}"),
                )
            } else {
                Rejection::new(422, "invalid_module", format!("the module does not validate: {e}"))
            }
        })?;
        let kind = check_interface(&module)?;
        let abi = Abi::of(&module);
        // Instantiate once: runs the start function under the limits and checks the marker.
        let mut store = self.new_store();
        let version = (|| -> wasmtime::Result<i32> {
            store.set_fuel(self.limits.fuel_per_call)?;
            let instance = self.linker.instantiate(&mut store, &module)?;
            let marker = instance.get_typed_func::<(), i32>(&mut store, abi.marker())?;
            marker.call(&mut store, ())
        })()
        .map_err(|e| {
            let f = classify(&e, store.data().memory_denied);
            if f.kind == FailureKind::Unavailable {
                // The node's state, not the module's: retry later.
                return Rejection::new(503, "instance_pool_full", f.message);
            }
            Rejection::new(
                422,
                "instantiation_failed",
                format!("the module fails to start ({}): {}", f.kind.as_str(), f.message),
            )
        })?;
        if version != abi.number() {
            return Err(Rejection::new(
                422,
                "abi_version",
                format!(
                    "`{}` returns {version}; this node speaks ABI {} and {}",
                    abi.marker(),
                    Abi::V1.number(),
                    Abi::V2.number()
                ),
            ));
        }
        if let Ok(mut m) = self.modules.lock() {
            m.insert(digest, module.clone());
        }
        Ok(Validated { digest, module, kind })
    }
}
