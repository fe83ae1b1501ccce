//! Request validation at the gRPC edge.
//!
//! Every rejection is `ControlError::InvalidArgument` with a message that says
//! what to pass instead.

use super::backend::{
    Compression, ControlError, CreateVolume, DEFAULT_BLOCK_SIZE, DEFAULT_REPLICAS, MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
};
use ballast_proto::v1 as pb;

/// Longest accepted volume or snapshot name.
pub const MAX_NAME_LEN: usize = 128;

const NAME_RULE: &str = "1-128 characters from A-Z, a-z, 0-9, '.', '_' and '-'";

fn invalid(msg: String) -> ControlError {
    ControlError::InvalidArgument(msg)
}

/// Check a volume or snapshot name. `what` is e.g. "volume" or "snapshot".
pub fn name(what: &str, name: &str) -> Result<(), ControlError> {
    if name.is_empty() {
        return Err(invalid(format!(
            "{what} name must not be empty; pass {NAME_RULE}"
        )));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "{what} name is {} characters long; pass {NAME_RULE}",
            name.chars().count()
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(format!(
            "invalid {what} name {name:?}: character {bad:?} is not allowed; pass {NAME_RULE}"
        )));
    }
    if name == "." || name == ".." {
        return Err(invalid(format!(
            "invalid {what} name {name:?}; pass {NAME_RULE} other than \".\" or \"..\""
        )));
    }
    Ok(())
}

/// Resolve a requested block size (0 = default) and check it.
pub fn block_size(requested: u32) -> Result<u32, ControlError> {
    let bs = if requested == 0 {
        DEFAULT_BLOCK_SIZE
    } else {
        requested
    };
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(invalid(format!(
            "block size {bs} is not supported; pass a power of two from {MIN_BLOCK_SIZE} to \
             {MAX_BLOCK_SIZE} (e.g. 4096), or 0 for the default {DEFAULT_BLOCK_SIZE}"
        )));
    }
    Ok(bs)
}

/// Check a volume size against its block size.
pub fn size(size_bytes: u64, block_size: u32) -> Result<(), ControlError> {
    if size_bytes == 0 {
        return Err(invalid(
            "size must be greater than 0; pass the volume size in bytes, a multiple of the \
             block size (e.g. 10737418240 for 10 GiB)"
                .to_string(),
        ));
    }
    let bs = u64::from(block_size);
    if !size_bytes.is_multiple_of(bs) {
        let down = size_bytes / bs * bs;
        let up = down.checked_add(bs);
        let suggestion = match (down, up) {
            (0, Some(up)) => format!("e.g. {up}"),
            (down, Some(up)) => format!("e.g. {down} or {up}"),
            (down, None) => format!("e.g. {down}"),
        };
        return Err(invalid(format!(
            "size {size_bytes} bytes is not a multiple of the block size {block_size}; pass a \
             multiple of {block_size} ({suggestion})"
        )));
    }
    Ok(())
}

/// Validate a create request and apply defaults.
pub fn create(req: pb::CreateVolumeRequest) -> Result<CreateVolume, ControlError> {
    name("volume", &req.name)?;
    let block_size = block_size(req.block_size)?;
    size(req.size_bytes, block_size)?;
    let compression = match req.compression.as_deref() {
        None | Some("") => Compression::default(),
        Some(c) => c.parse()?,
    };
    let replicas = if req.replicas == 0 {
        DEFAULT_REPLICAS
    } else {
        req.replicas
    };
    Ok(CreateVolume {
        name: req.name,
        size_bytes: req.size_bytes,
        block_size,
        dedup: req.dedup.unwrap_or(true),
        compression,
        replicas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, size: u64, bs: u32) -> pb::CreateVolumeRequest {
        pb::CreateVolumeRequest {
            name: name.into(),
            size_bytes: size,
            block_size: bs,
            dedup: None,
            compression: None,
            replicas: 0,
        }
    }

    fn msg(e: ControlError) -> String {
        match e {
            ControlError::InvalidArgument(m) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn names() {
        for ok in [
            "a",
            "vol-1",
            "db_data.v2",
            "A.B-C_d",
            &"x".repeat(128),
            "...",
        ] {
            assert!(name("volume", ok).is_ok(), "{ok}");
        }
        assert!(msg(name("volume", "").unwrap_err()).contains("must not be empty"));
        assert!(msg(name("volume", &"x".repeat(129)).unwrap_err()).contains("129 characters"));
        let m = msg(name("snapshot", "a/b").unwrap_err());
        assert!(m.contains("invalid snapshot name \"a/b\""), "{m}");
        assert!(m.contains("'/'"), "{m}");
        assert!(name("volume", "with space").is_err());
        assert!(name("volume", "ünïcode").is_err());
        assert!(name("volume", ".").is_err());
        assert!(name("volume", "..").is_err());
    }

    #[test]
    fn block_sizes() {
        assert_eq!(block_size(0).unwrap(), 4096);
        for bs in [512, 1024, 4096, 65536] {
            assert_eq!(block_size(bs).unwrap(), bs);
        }
        for bad in [1, 256, 3000, 131072, 4097] {
            let m = msg(block_size(bad).unwrap_err());
            assert!(m.contains("power of two from 512 to 65536"), "{m}");
        }
    }

    #[test]
    fn sizes() {
        assert!(size(4096, 4096).is_ok());
        assert!(size(1 << 40, 512).is_ok());
        assert!(msg(size(0, 4096).unwrap_err()).contains("greater than 0"));
        let m = msg(size(10000, 4096).unwrap_err());
        assert!(m.contains("e.g. 8192 or 12288"), "{m}");
        let m = msg(size(100, 4096).unwrap_err());
        assert!(m.contains("e.g. 4096"), "{m}");
        let m = msg(size(u64::MAX, 4096).unwrap_err());
        assert!(m.contains("not a multiple"), "{m}");
    }

    #[test]
    fn create_defaults() {
        let c = create(req("v", 1 << 20, 0)).unwrap();
        assert_eq!(c.block_size, 4096);
        assert!(c.dedup);
        assert_eq!(c.compression, Compression::Lz4);
        assert_eq!(c.replicas, 1);

        let mut r = req("v", 1 << 20, 512);
        r.dedup = Some(false);
        r.compression = Some("none".into());
        r.replicas = 3;
        let c = create(r).unwrap();
        assert_eq!(c.block_size, 512);
        assert!(!c.dedup);
        assert_eq!(c.compression, Compression::None);
        assert_eq!(c.replicas, 3);
    }

    #[test]
    fn create_rejects() {
        assert!(create(req("", 4096, 0)).is_err());
        assert!(create(req("v", 0, 0)).is_err());
        assert!(create(req("v", 4096, 1000)).is_err());
        assert!(create(req("v", 4097, 0)).is_err());
        let mut r = req("v", 4096, 0);
        r.compression = Some("zstd".into());
        let m = msg(create(r).unwrap_err());
        assert!(m.contains("pass \"lz4\" or \"none\""), "{m}");
    }
}
