//! Where the process's threads run. Shards pin to the CPUs of the process's affinity mask
//! (`taskset`, `docker --cpuset-cpus`, a cgroup cpuset), in order; the bridge and the
//! operations threads take the mask's CPUs no shard uses, so they never share one with a
//! shard while the mask has room (otherwise they stay unpinned within the mask).

use shards::cpus::CpuMask;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error(
        "{shards} shards asked for but the process may run on {} (mask {mask}): lower `shards` or set `pin_cores = false`",
        cpus(mask.len())
    )]
    TooManyShards { shards: usize, mask: CpuMask },
    #[error(
        "{shards} shards and `bridge_cpu` = {cpu} need {} but the process may run on {} (mask {mask}): lower `shards`, unset `bridge_cpu` or set `pin_cores = false`",
        cpus(shards + 1),
        cpus(mask.len())
    )]
    NoRoomForBridge { shards: usize, cpu: usize, mask: CpuMask },
    #[error("`bridge_cpu` = {cpu} is not a CPU the process may run on (mask {mask})")]
    BridgeOutsideMask { cpu: usize, mask: CpuMask },
}

fn cpus(n: usize) -> String {
    if n == 1 { "1 CPU".to_owned() } else { format!("{n} CPUs") }
}

/// CPUs per thread; an empty list leaves the thread unpinned within the mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub mask: CpuMask,
    /// Shard i's CPU (empty: shards unpinned).
    pub shards: Vec<usize>,
    /// The bridge thread's CPUs.
    pub bridge: Vec<usize>,
    /// The operations threads' CPUs (ops-http and the data directory probe).
    pub ops: Vec<usize>,
}

impl Placement {
    /// Places `shards` shards in `mask`: with `pin`, shard i on the i-th CPU of the mask
    /// (skipping `bridge_cpu`), the bridge on `bridge_cpu` or else on the CPUs left, the
    /// operations threads on the CPUs left (the bridge's when none other is). Without `pin`
    /// nothing is pinned (`bridge_cpu` needs `pin`; the config refuses it alone).
    pub fn plan(shards: usize, pin: bool, bridge_cpu: Option<usize>, mask: &CpuMask) -> Result<Self, PlacementError> {
        let unpinned = Self { mask: mask.clone(), shards: Vec::new(), bridge: Vec::new(), ops: Vec::new() };
        if !pin {
            return Ok(unpinned);
        }
        if shards > mask.len() {
            return Err(PlacementError::TooManyShards { shards, mask: mask.clone() });
        }
        let Some(cpu) = bridge_cpu else {
            let (taken, left) = mask.cpus().split_at(shards);
            return Ok(Self { shards: taken.to_vec(), bridge: left.to_vec(), ops: left.to_vec(), ..unpinned });
        };
        if !mask.contains(cpu) {
            return Err(PlacementError::BridgeOutsideMask { cpu, mask: mask.clone() });
        }
        let others: Vec<usize> = mask.cpus().iter().copied().filter(|&c| c != cpu).collect();
        if shards > others.len() {
            return Err(PlacementError::NoRoomForBridge { shards, cpu, mask: mask.clone() });
        }
        let (taken, left) = others.split_at(shards);
        let ops = if left.is_empty() { vec![cpu] } else { left.to_vec() };
        Ok(Self { shards: taken.to_vec(), bridge: vec![cpu], ops, ..unpinned })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(cpus: &[usize]) -> CpuMask {
        CpuMask::new(cpus.iter().copied())
    }

    #[test]
    fn shards_take_the_masks_cpus_in_order_and_the_bridge_the_rest() {
        let p = Placement::plan(2, true, None, &mask(&[2, 3, 5, 7])).unwrap();
        assert_eq!((p.shards, p.bridge, p.ops), (vec![2, 3], vec![5, 7], vec![5, 7]));
        // No room: the bridge stays unpinned within the mask.
        let p = Placement::plan(2, true, None, &mask(&[4, 6])).unwrap();
        assert_eq!((p.shards, p.bridge.is_empty(), p.ops.is_empty()), (vec![4, 6], true, true));
    }

    #[test]
    fn the_bridge_cpu_is_skipped_by_the_shards() {
        let p = Placement::plan(2, true, Some(0), &mask(&[0, 1, 2, 3])).unwrap();
        assert_eq!((p.shards, p.bridge, p.ops), (vec![1, 2], vec![0], vec![3]));
        let p = Placement::plan(1, true, Some(1), &mask(&[0, 1])).unwrap();
        assert_eq!((p.shards, p.bridge, p.ops), (vec![0], vec![1], vec![1]));
    }

    #[test]
    fn too_many_shards_are_refused_naming_the_mask_unless_unpinned() {
        let e = Placement::plan(3, true, None, &mask(&[0, 1])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "3 shards asked for but the process may run on 2 CPUs (mask 0-1): lower `shards` or set `pin_cores = false`"
        );
        let e = Placement::plan(2, true, Some(1), &mask(&[0, 1])).unwrap_err();
        assert_eq!(e, PlacementError::NoRoomForBridge { shards: 2, cpu: 1, mask: mask(&[0, 1]) });
        assert!(e.to_string().contains("need 3 CPUs but the process may run on 2 CPUs (mask 0-1)"), "{e}");
        let e = Placement::plan(1, true, Some(5), &mask(&[0, 1])).unwrap_err();
        assert_eq!(e.to_string(), "`bridge_cpu` = 5 is not a CPU the process may run on (mask 0-1)");
        let p = Placement::plan(3, false, None, &mask(&[1])).unwrap();
        assert!(p.shards.is_empty() && p.bridge.is_empty() && p.ops.is_empty());
    }
}
