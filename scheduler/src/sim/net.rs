//! Flow-level links: every transfer is a flow of bytes from a node (or the
//! origin) to a node, advanced in fixed time steps.
//!
//! Sharing is **equal share per step**, not max-min: in each step a flow
//! gets `min(uplink / uploads of its sender, downlink / downloads of its
//! receiver)`, an origin flow `min(origin / origin flows, downlink share)`,
//! a cross-zone flow at most the cross-zone cap. Capacity a flow cannot use
//! (because its other end is the bottleneck) is not handed to others, so
//! links are, if anything, under-used.
//!
//! Invariants: `up[n]` / `down[n]` / `origin` count exactly the live flows
//! with that sender / receiver / origin source; a flow id stays valid until
//! [`Net::end`] (the owner must drop its references then).

/// Where a flow's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    Origin,
    Peer(u32),
}

/// One transfer.
#[derive(Clone, Debug)]
pub struct Flow {
    pub live: bool,
    pub src: Src,
    pub dst: u32,
    pub blob: u32,
    /// First piece it carries (peer flows carry exactly one).
    pub piece: u32,
    /// Bytes it carries in all.
    pub bytes: u64,
    /// Bytes still to move (may go below zero in the step it completes).
    pub left: f64,
    /// Sender and receiver are in different zones.
    pub cross_zone: bool,
}

impl Flow {
    /// Bytes moved so far.
    pub fn moved(&self) -> u64 {
        let left = self.left.max(0.0) as u64;
        self.bytes.saturating_sub(left)
    }
}

/// Link capacities, bytes per second.
#[derive(Clone, Copy, Debug)]
pub struct Links {
    pub origin: f64,
    pub up: f64,
    pub down: f64,
    pub cross_zone: Option<f64>,
}

#[derive(Debug)]
pub struct Net {
    links: Links,
    flows: Vec<Flow>,
    free: Vec<u32>,
    up: Vec<u32>,
    down: Vec<u32>,
    origin: u32,
}

impl Net {
    pub fn new(links: Links, nodes: usize) -> Self {
        Self {
            links,
            flows: Vec::new(),
            free: Vec::new(),
            up: vec![0; nodes],
            down: vec![0; nodes],
            origin: 0,
        }
    }

    /// Start a flow; returns its id.
    pub fn start(
        &mut self,
        src: Src,
        dst: u32,
        blob: u32,
        piece: u32,
        bytes: u64,
        cross_zone: bool,
    ) -> u32 {
        match src {
            Src::Origin => self.origin += 1,
            Src::Peer(s) => self.up[s as usize] += 1,
        }
        self.down[dst as usize] += 1;
        let flow = Flow {
            live: true,
            src,
            dst,
            blob,
            piece,
            bytes,
            left: bytes as f64,
            cross_zone,
        };
        match self.free.pop() {
            Some(id) => {
                self.flows[id as usize] = flow;
                id
            }
            None => {
                self.flows.push(flow);
                (self.flows.len() - 1) as u32
            }
        }
    }

    /// Count `bytes` as already moved (carried over from a previous flow).
    pub fn credit(&mut self, id: u32, bytes: u64) {
        if let Some(f) = self.flows.get_mut(id as usize).filter(|f| f.live) {
            f.left -= bytes as f64;
        }
    }

    pub fn get(&self, id: u32) -> Option<&Flow> {
        self.flows.get(id as usize).filter(|f| f.live)
    }

    /// End a flow (completed or cut); returns it.
    pub fn end(&mut self, id: u32) -> Option<Flow> {
        let f = self.flows.get_mut(id as usize).filter(|f| f.live)?;
        f.live = false;
        let f = f.clone();
        match f.src {
            Src::Origin => self.origin -= 1,
            Src::Peer(s) => self.up[s as usize] -= 1,
        }
        self.down[f.dst as usize] -= 1;
        self.free.push(id);
        Some(f)
    }

    /// Uploads node `n` serves now.
    pub fn uploads(&self, n: u32) -> u32 {
        self.up[n as usize]
    }

    /// Ids of live flows matching `pred`.
    pub fn find(&self, pred: impl Fn(&Flow) -> bool) -> Vec<u32> {
        self.flows
            .iter()
            .enumerate()
            .filter(|(_, f)| f.live && pred(f))
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Live flows now.
    pub fn live(&self) -> usize {
        self.flows.len() - self.free.len()
    }

    /// Move every flow forward by `dt_s` seconds; push the ids of flows that
    /// completed into `done` (they stay live until [`Net::end`]).
    pub fn step(&mut self, dt_s: f64, done: &mut Vec<u32>) {
        let l = self.links;
        let origin_share = l.origin / f64::from(self.origin.max(1));
        for (i, f) in self.flows.iter_mut().enumerate() {
            if !f.live || f.left <= 0.0 {
                continue;
            }
            let mut rate = l.down / f64::from(self.down[f.dst as usize].max(1));
            rate = match f.src {
                Src::Origin => rate.min(origin_share),
                Src::Peer(s) => rate.min(l.up / f64::from(self.up[s as usize].max(1))),
            };
            if let (true, Some(cap)) = (f.cross_zone, l.cross_zone) {
                rate = rate.min(cap);
            }
            f.left -= rate * dt_s;
            if f.left <= 0.0 {
                done.push(i as u32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_share_of_the_bottleneck() {
        let links = Links {
            origin: 100.0,
            up: 1000.0,
            down: 1000.0,
            cross_zone: None,
        };
        let mut net = Net::new(links, 3);
        let a = net.start(Src::Origin, 0, 0, 0, 100, false);
        let b = net.start(Src::Origin, 1, 0, 0, 100, false);
        let c = net.start(Src::Peer(0), 2, 0, 0, 2000, false);
        let mut done = Vec::new();
        net.step(1.0, &mut done);
        assert!(done.is_empty());
        assert_eq!(net.get(a).map(Flow::moved), Some(50), "origin split in two");
        assert_eq!(
            net.get(c).map(Flow::moved),
            Some(1000),
            "peer link unshared"
        );
        net.step(1.0, &mut done);
        assert_eq!(done.len(), 3);
        assert!(net.end(a).is_some() && net.end(b).is_some() && net.end(c).is_some());
        assert!(net.end(a).is_none(), "ended twice");
        assert_eq!(net.live(), 0);
        assert_eq!(net.uploads(0), 0);
    }
}
