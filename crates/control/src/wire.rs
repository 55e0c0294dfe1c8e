//! The JSON encoding of the lifecycle and store types, for stores that keep them as documents
//! (etcd, `store/etcd.rs`). The encoding is part of the stored format: every field name and
//! enumeration code is written out in the derives, so renaming a Rust item never changes what is
//! stored. The conventions, as in the SQLite schema:
//!
//! - colours are `"blue"` / `"green"`;
//! - durations are whole nanoseconds in fields named `..._ns` (at most `u64::MAX`, about 584
//!   years; the config refuses anything over 292);
//! - instants are unix milliseconds in fields named `..._ms`;
//! - enumerations are tagged objects with lower-case codes (`{"kind": "started", ...}`);
//! - rates are finite numbers: NaN and the infinities (which JSON cannot hold) are refused when
//!   encoding, never written as `null`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serializer};

/// A [`cutover_proxy::Colour`] as `"blue"` / `"green"`.
pub mod colour {
    use super::*;
    use cutover_proxy::Colour;

    pub fn serialize<S: Serializer>(c: &Colour, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(c.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Colour, D::Error> {
        let code = String::deserialize(d)?;
        code.parse()
            .map_err(|_| D::Error::custom(format!("colour {code:?} is neither \"blue\" nor \"green\"")))
    }
}

/// A [`Duration`] as whole nanoseconds.
pub mod nanos {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let ns = u64::try_from(d.as_nanos())
            .map_err(|_| S::Error::custom(format!("duration {d:?} is too long to store (over about 584 years)")))?;
        s.serialize_u64(ns)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_nanos)
    }
}

/// An optional [`Duration`] as whole nanoseconds or `null`.
pub mod opt_nanos {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => nanos::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_nanos))
    }
}

/// An `f64` that must be finite.
pub mod finite {
    use super::*;

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if !x.is_finite() {
            return Err(S::Error::custom(format!("{x} is not a finite number")));
        }
        s.serialize_f64(*x)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        f64::deserialize(d)
    }
}

/// A [`SystemTime`] as unix milliseconds (negative before 1970), the precision the stores keep.
pub mod millis {
    use super::*;

    pub fn to_ms(t: SystemTime) -> i64 {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
        }
    }

    pub fn from_ms(ms: i64) -> SystemTime {
        let d = Duration::from_millis(ms.unsigned_abs());
        if ms >= 0 {
            UNIX_EPOCH + d
        } else {
            UNIX_EPOCH - d
        }
    }

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(to_ms(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        i64::deserialize(d).map(from_ms)
    }
}

/// An optional [`SystemTime`] as unix milliseconds or `null`.
pub mod opt_millis {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => millis::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Ok(Option::<i64>::deserialize(d)?.map(millis::from_ms))
    }
}

/// [`crate::lifecycle::Record::Interrupted`]'s phase: one of [`crate::lifecycle::Phase::name`]'s
/// names, given back as the `&'static str` the record holds.
pub mod phase_name {
    use super::*;

    /// Every phase's name as [`crate::lifecycle::Phase::name`] gives it.
    pub const NAMES: [&str; 6] = [
        "stable",
        "migrating",
        "provisioning",
        "validating",
        "ready to promote",
        "watching",
    ];

    pub fn serialize<S: Serializer>(name: &&'static str, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(name)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
        let name = String::deserialize(d)?;
        NAMES
            .into_iter()
            .find(|n| *n == name)
            .ok_or_else(|| D::Error::custom(format!("phase {name:?} is not a phase this cutover knows")))
    }
}
