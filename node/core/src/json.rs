//! JSON helpers for validating request bodies: the member at fault is named by its path
//! (`filter.all[1].op`), so an author can find the mistake.

use std::fmt;

use serde_json::{Map, Value};

#[doc(hidden)]
pub use serde;

/// A rejected request body (a rule, a channel, a template): the JSON path of the member at
/// fault (`""` for the body itself) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub detail: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
        FieldError { field: field.into(), detail: detail.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.detail)
        } else {
            write!(f, "{}: {}", self.field, self.detail)
        }
    }
}

impl std::error::Error for FieldError {}

/// A member that is present and not `null`.
pub fn member<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

pub fn string<'a>(v: &'a Value, path: &str) -> Result<&'a str, FieldError> {
    v.as_str().ok_or_else(|| FieldError::new(path, "must be a string"))
}

pub fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, FieldError> {
    v.as_object().ok_or_else(|| FieldError::new(path, "must be an object"))
}

pub fn array<'a>(v: &'a Value, path: &str, max: usize) -> Result<&'a [Value], FieldError> {
    let a = v.as_array().ok_or_else(|| FieldError::new(path, "must be an array"))?;
    if a.len() > max {
        return Err(FieldError::new(path, format!("must have at most {max} entries")));
    }
    Ok(a)
}

pub fn only_members(obj: &Map<String, Value>, path: &str, allowed: &[&str]) -> Result<(), FieldError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(FieldError::new(join(path, k), format!("unknown member; allowed: {}", allowed.join(", ")))),
        None => Ok(()),
    }
}

/// An optional non-negative integer in `min..=max`; absent is 0.
pub fn integer(v: Option<&Value>, path: &str, min: u64, max: u64) -> Result<u64, FieldError> {
    let Some(v) = v else { return Ok(0) };
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(FieldError::new(path, format!("must be an integer from {min} to {max}"))),
    }
}

/// Defines a closed set of names as an enum: `ALL`, `as_str`, `from_name` and `names`, and serde
/// in snake case.
#[macro_export]
macro_rules! named_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, $crate::json::serde::Serialize, $crate::json::serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The name used in rule definitions.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The value with this name in rule definitions.
            pub fn from_name(s: &str) -> Option<$name> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s)
            }

            /// Every name, comma-separated (for error messages).
            pub fn names() -> String {
                Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
            }
        }
    };
}
