//! What a GPU has free, by `nvidia-smi` (the driver's figure, which candle's pool and other
//! processes' memory are already out of), and what the host has available: what `train
//! --plan` checks a run against and what `evaluate` sizes its generation batches by.

use anyhow::{bail, Context, Result};

/// The free memory of the run's device, in bytes, and where the figure comes from: a
/// CUDA device's by `nvidia-smi`; the CPU's, the host's available memory
/// ([`host_available`]); None for another device.
pub fn device_memory(device: &str) -> Result<Option<(u64, String)>> {
    if device == "cpu" {
        let why = "available host memory, by /proc/meminfo".to_string();
        return Ok(Some((host_available()?, why)));
    }
    let Some(rest) = device.strip_prefix("cuda") else {
        return Ok(None);
    };
    let ordinal = match rest.strip_prefix(':') {
        None if rest.is_empty() => Some(0),
        Some(n) => n.parse().ok(),
        None => None,
    }
    .ok_or_else(|| anyhow::anyhow!("device '{device}': expected cuda or cuda:N"))?;
    let (total, used) = gpu_memory(ordinal)?;
    Ok(Some((
        total.saturating_sub(used),
        format!("free on {device}, by nvidia-smi"),
    )))
}

/// The total and used memory, in bytes, of the GPU that CUDA numbers `ordinal` in this
/// process, by `nvidia-smi`.
pub fn gpu_memory(ordinal: usize) -> Result<(u64, u64)> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let index = smi_id(ordinal, visible.as_deref());
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "-i",
            &index,
            "--query-gpu=memory.total,memory.used",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .context("cannot run nvidia-smi to read the GPU's memory")?;
    if !out.status.success() {
        bail!(
            "nvidia-smi -i {index}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (total, used) = parse_nvidia_smi(&text)
        .with_context(|| format!("nvidia-smi printed {text:?}; expected 'total, used' in MiB"))?;
    Ok((total << 20, used << 20))
}

/// What `nvidia-smi -i` calls CUDA's device `ordinal`: with `CUDA_VISIBLE_DEVICES` set,
/// its entry at that place (an index, a UUID or a MIG name, which nvidia-smi takes as they
/// are); without it, the ordinal itself.
fn smi_id(ordinal: usize, visible: Option<&str>) -> String {
    visible
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| v.split(',').nth(ordinal))
        .map_or_else(|| ordinal.to_string(), |id| id.trim().to_string())
}

/// The host memory available to a new process, in bytes: `MemAvailable` of /proc/meminfo
/// (free memory and what the kernel can reclaim without swapping; Linux).
pub fn host_available() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .context("cannot read /proc/meminfo for the host's available memory")?;
    mem_available(&text).with_context(|| "/proc/meminfo has no 'MemAvailable: N kB' line")
}

/// `MemAvailable` of /proc/meminfo's text, in bytes.
fn mem_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut fields = line["MemAvailable:".len()..].split_whitespace();
    let kib: u64 = fields.next()?.parse().ok()?;
    (fields.next() == Some("kB")).then_some(kib << 10)
}

/// `total, used` (MiB) of nvidia-smi's CSV line.
fn parse_nvidia_smi(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().next()?;
    let (total, used) = line.split_once(',')?;
    Some((total.trim().parse().ok()?, used.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cudas_ordinal_is_named_as_nvidia_smi_names_it() {
        assert_eq!(smi_id(1, None), "1");
        assert_eq!(smi_id(0, Some("")), "0");
        assert_eq!(smi_id(1, Some("3,5")), "5");
        assert_eq!(smi_id(0, Some(" GPU-8f2c , 2")), "GPU-8f2c");
    }

    #[test]
    fn the_hosts_available_memory_is_read_in_kib() {
        let text = "MemTotal:       24570000 kB\nMemFree:  100 kB\nMemAvailable:   20480 kB\n";
        assert_eq!(mem_available(text), Some(20480 << 10));
        assert_eq!(mem_available("MemAvailable: 12 MB\n"), None);
        assert_eq!(mem_available("MemFree: 12 kB\n"), None);
        // This machine's own figure, when it has one, is a positive number of bytes.
        if let Ok(bytes) = host_available() {
            assert!(bytes > 0);
        }
    }

    #[test]
    fn nvidia_smis_line_is_read_in_mib() {
        assert_eq!(parse_nvidia_smi("81559, 1024\n"), Some((81559, 1024)));
        assert_eq!(parse_nvidia_smi("[N/A], 3"), None);
        assert_eq!(parse_nvidia_smi(""), None);
    }
}
