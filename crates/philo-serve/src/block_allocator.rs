//! The block bookkeeping of a paged KV cache: which of the `num_blocks` fixed-size blocks are
//! free, who holds the others, and which hold a known prefix that a later sequence may share.
//!
//! The K/V tensors live with the model; this module only hands out block ids. A block is held
//! through a reference count. A *full* block whose tokens are known can be registered as a
//! prefix block: a later sequence whose leading tokens (and LoRA adapter) are the same then
//! takes a reference to it instead of recomputing it. A registered block whose last holder
//! released it stays registered while free, so an identical prompt arriving later can revive
//! it; such blocks are evicted (least recently released first) only when no never-registered
//! free block is left.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Names the exact content a registered block stands for: its tokens, its adapter and
/// (through its parent's id) every token before it. Ids are never reused, so a child entry
/// whose parent was evicted can no longer be reached, and matching a chain of ids block by
/// block proves the whole prefix equal, not only its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefixId(u64);

/// What [`BlockAllocator::lookup_prefix`] found: the shared blocks, in order, each with a
/// reference taken for the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixMatch {
    /// The leading blocks of the sequence, `blocks.len() * block_size` tokens.
    pub blocks: Vec<u32>,
    /// The prefix id of the last block, to pass as the parent when registering the next
    /// block of the same sequence; `None` when nothing matched.
    pub last: Option<PrefixId>,
}

/// The prefix a registered block holds, kept to verify a hash hit.
#[derive(Debug)]
struct Registration {
    /// The key it is stored under in `BlockAllocator::by_key`.
    key: u64,
    id: PrefixId,
    parent: Option<PrefixId>,
    adapter: Option<u32>,
    tokens: Vec<u32>,
}

#[derive(Debug, Default)]
struct BlockState {
    refcount: u32,
    registration: Option<Registration>,
    /// Its key in `BlockAllocator::evictable` while it is free and registered.
    released_at: Option<u64>,
}

/// Hands out the blocks of a paged KV cache and shares full prefix blocks between sequences.
#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    blocks: Vec<BlockState>,
    /// Free blocks that hold no registered prefix: handed out first, as losing them costs
    /// nothing.
    fresh: Vec<u32>,
    /// Free blocks that still hold a registered prefix, by release time (oldest first).
    evictable: BTreeMap<u64, u32>,
    /// Registered blocks by the hash of (parent id, adapter, tokens).
    by_key: HashMap<u64, u32>,
    /// Orders releases for the LRU eviction.
    clock: u64,
    next_prefix_id: u64,
}

/// The hash a block's prefix is stored under. `DefaultHasher::new()` uses fixed keys, so the
/// value is the same for the same input within the process, which is all the map needs; a
/// hit is always verified against the stored content.
fn prefix_key(parent: Option<PrefixId>, tokens: &[u32], adapter: Option<u32>) -> u64 {
    let mut hasher = DefaultHasher::new();
    parent.hash(&mut hasher);
    adapter.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

impl BlockAllocator {
    /// A cache of `num_blocks` free blocks of `block_size` token slots each.
    ///
    /// # Panics
    /// When `block_size` is 0 or `num_blocks` does not fit a `u32` block id.
    pub fn new(num_blocks: usize, block_size: usize) -> BlockAllocator {
        assert!(
            block_size > 0,
            "the KV block size must be at least one token"
        );
        let ids = u32::try_from(num_blocks).expect("num_blocks must fit a u32 block id");
        BlockAllocator {
            block_size,
            blocks: (0..num_blocks).map(|_| BlockState::default()).collect(),
            // Reversed so that `pop` hands out 0, 1, 2, … on a fresh cache.
            fresh: (0..ids).rev().collect(),
            evictable: BTreeMap::new(),
            by_key: HashMap::new(),
            clock: 0,
            next_prefix_id: 0,
        }
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// All blocks of the cache.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that [`allocate`](Self::allocate) can hand out, including free blocks that
    /// still cache a prefix.
    pub fn num_free(&self) -> usize {
        self.fresh.len() + self.evictable.len()
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Takes a free block with a reference count of 1, or `None` when every block is held.
    /// A never-registered block is preferred; otherwise the least recently released cached
    /// prefix block is evicted (its registration dropped).
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.fresh.pop() {
            Some(block) => block,
            None => {
                let (_, block) = self.evictable.pop_first()?;
                let state = &mut self.blocks[block as usize];
                state.released_at = None;
                if let Some(registration) = state.registration.take() {
                    self.by_key.remove(&registration.key);
                }
                block
            }
        };
        let state = &mut self.blocks[block as usize];
        debug_assert_eq!(state.refcount, 0, "a free block is held");
        state.refcount = 1;
        Some(block)
    }

    /// Takes `n` free blocks, or none at all when fewer than `n` are free.
    pub fn allocate_n(&mut self, n: usize) -> Option<Vec<u32>> {
        if self.num_free() < n {
            return None;
        }
        // Cannot come up short: `n` blocks are free and nothing else allocates meanwhile.
        (0..n).map(|_| self.allocate()).collect()
    }

    /// Drops one reference to `block`. At zero the block is free: kept as an evictable cached
    /// prefix when it is registered, plainly free otherwise.
    pub fn release(&mut self, block: u32) {
        let state = &mut self.blocks[block as usize];
        debug_assert!(state.refcount > 0, "block {block} released while free");
        if state.refcount == 0 {
            return;
        }
        state.refcount -= 1;
        if state.refcount > 0 {
            return;
        }
        if state.registration.is_some() {
            self.clock += 1;
            state.released_at = Some(self.clock);
            self.evictable.insert(self.clock, block);
        } else {
            self.fresh.push(block);
        }
    }

    /// The longest run of registered blocks equal to the leading full blocks of `tokens` under
    /// `adapter`, covering at most `max_tokens` tokens. Each returned block gets a reference
    /// for the caller (to [`release`](Self::release) like an allocated one); a cached free
    /// block is revived. Every hit is checked against the stored tokens, adapter and parent,
    /// so a hash collision never shares a block.
    pub fn lookup_prefix(
        &mut self,
        tokens: &[u32],
        adapter: Option<u32>,
        max_tokens: usize,
    ) -> PrefixMatch {
        let full_blocks = tokens.len().min(max_tokens) / self.block_size;
        let mut found = PrefixMatch::default();
        for chunk in tokens[..full_blocks * self.block_size].chunks_exact(self.block_size) {
            let key = prefix_key(found.last, chunk, adapter);
            let Some(&block) = self.by_key.get(&key) else {
                break;
            };
            let state = &mut self.blocks[block as usize];
            let Some(registration) = &state.registration else {
                debug_assert!(false, "block {block} is in the prefix map unregistered");
                break;
            };
            if registration.parent != found.last
                || registration.adapter != adapter
                || registration.tokens != chunk
            {
                break;
            }
            found.last = Some(registration.id);
            if let Some(released_at) = state.released_at.take() {
                self.evictable.remove(&released_at);
            }
            state.refcount += 1;
            found.blocks.push(block);
        }
        found
    }

    /// Registers `block`, held by the caller and now holding `tokens` (exactly one full block)
    /// after the prefix named by `parent` (`None` for the first block), as computed under
    /// `adapter`. Returns the id to pass as `parent` for the sequence's next block.
    ///
    /// When the same prefix is registered already (two sequences computed it side by side),
    /// the existing id is returned and `block` stays private. When another prefix occupies the
    /// hash (a collision) or the call is not for a full, held, unregistered block, `block`
    /// stays private under a new id, which later blocks may still chain on.
    pub fn register_full_block(
        &mut self,
        block: u32,
        parent: Option<PrefixId>,
        tokens: &[u32],
        adapter: Option<u32>,
    ) -> PrefixId {
        let state = &self.blocks[block as usize];
        let valid =
            tokens.len() == self.block_size && state.refcount > 0 && state.registration.is_none();
        debug_assert!(valid, "block {block} cannot be registered");
        let key = prefix_key(parent, tokens, adapter);
        if valid {
            match self.by_key.get(&key) {
                Some(&existing) => {
                    if let Some(registration) = &self.blocks[existing as usize].registration {
                        if registration.parent == parent
                            && registration.adapter == adapter
                            && registration.tokens == tokens
                        {
                            return registration.id;
                        }
                    }
                }
                None => {
                    let id = self.new_prefix_id();
                    self.blocks[block as usize].registration = Some(Registration {
                        key,
                        id,
                        parent,
                        adapter,
                        tokens: tokens.to_vec(),
                    });
                    self.by_key.insert(key, block);
                    return id;
                }
            }
        }
        self.new_prefix_id()
    }

    fn new_prefix_id(&mut self) -> PrefixId {
        self.next_prefix_id += 1;
        PrefixId(self.next_prefix_id)
    }
}

#[cfg(test)]
impl BlockAllocator {
    /// The reference count of `block`.
    pub(crate) fn refcount(&self, block: u32) -> u32 {
        self.blocks[block as usize].refcount
    }

    /// Checks that the free lists, reference counts and prefix map agree.
    pub(crate) fn assert_consistent(&self) {
        let mut free = vec![false; self.blocks.len()];
        for &block in &self.fresh {
            let state = &self.blocks[block as usize];
            assert!(!free[block as usize], "block {block} is free twice");
            free[block as usize] = true;
            assert_eq!(state.refcount, 0);
            assert!(state.registration.is_none() && state.released_at.is_none());
        }
        for (&released_at, &block) in &self.evictable {
            let state = &self.blocks[block as usize];
            assert!(!free[block as usize], "block {block} is free twice");
            free[block as usize] = true;
            assert_eq!(state.refcount, 0);
            assert!(state.registration.is_some());
            assert_eq!(state.released_at, Some(released_at));
        }
        for (block, state) in self.blocks.iter().enumerate() {
            assert_eq!(free[block], state.refcount == 0, "block {block}");
            if let Some(registration) = &state.registration {
                assert_eq!(self.by_key.get(&registration.key), Some(&(block as u32)));
            }
        }
        for (&key, &block) in &self.by_key {
            let registration = self.blocks[block as usize].registration.as_ref();
            assert_eq!(registration.map(|r| r.key), Some(key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No blocks (typed: `[]` alone is ambiguous among the crate's `PartialEq` impls).
    const NONE: [u32; 0] = [];

    #[test]
    fn allocates_until_exhausted_and_reuses_released_blocks() {
        let mut alloc = BlockAllocator::new(3, 4);
        let blocks: Vec<u32> = (0..3).map(|_| alloc.allocate().unwrap()).collect();
        assert_eq!(blocks, [0, 1, 2]);
        assert_eq!(alloc.allocate(), None);
        assert_eq!((alloc.num_used(), alloc.num_free()), (3, 0));
        alloc.release(1);
        assert_eq!((alloc.num_used(), alloc.num_free()), (2, 1));
        assert_eq!(alloc.allocate(), Some(1));
        assert_eq!(alloc.allocate_n(1), None);
        for block in blocks {
            alloc.release(block);
        }
        assert_eq!(alloc.allocate_n(4), None, "all or nothing");
        assert_eq!(alloc.num_used(), 0);
        assert_eq!(alloc.allocate_n(3).map(|b| b.len()), Some(3));
        alloc.assert_consistent();
    }

    #[test]
    fn shared_prefix_blocks_are_reference_counted() {
        let mut alloc = BlockAllocator::new(4, 2);
        let a = alloc.allocate().unwrap();
        alloc.register_full_block(a, None, &[5, 6], None);
        let found = alloc.lookup_prefix(&[5, 6, 7], None, 3);
        assert_eq!(found.blocks, [a]);
        assert_eq!(alloc.refcount(a), 2);
        assert_eq!(alloc.num_used(), 1);
        alloc.release(a);
        assert_eq!((alloc.refcount(a), alloc.num_used()), (1, 1));
        alloc.release(a);
        assert_eq!((alloc.refcount(a), alloc.num_used()), (0, 0));
        assert_eq!(alloc.num_free(), 4, "a cached block counts as free");
        // Revived from the cache: held again and no longer free.
        let found = alloc.lookup_prefix(&[5, 6], None, 2);
        assert_eq!(found.blocks, [a]);
        assert_eq!((alloc.refcount(a), alloc.num_free()), (1, 3));
        alloc.assert_consistent();
        alloc.release(a);
        assert_eq!(alloc.num_used(), 0);
    }

    /// Registers `tokens` (whole blocks) as one sequence's chain; returns its blocks.
    fn register_chain(
        alloc: &mut BlockAllocator,
        tokens: &[u32],
        adapter: Option<u32>,
    ) -> Vec<u32> {
        let mut parent = None;
        let mut blocks = Vec::new();
        for chunk in tokens.chunks_exact(alloc.block_size()) {
            let block = alloc.allocate().unwrap();
            parent = Some(alloc.register_full_block(block, parent, chunk, adapter));
            blocks.push(block);
        }
        blocks
    }

    #[test]
    fn lookup_matches_only_full_blocks_and_the_same_adapter() {
        let mut alloc = BlockAllocator::new(8, 4);
        let prompt: Vec<u32> = (0..10).collect();
        let chain = register_chain(&mut alloc, &prompt[..8], Some(3));
        let lookup = |alloc: &mut BlockAllocator, tokens: &[u32], adapter, max| {
            let found = alloc.lookup_prefix(tokens, adapter, max);
            for &block in &found.blocks {
                alloc.release(block);
            }
            found.blocks
        };
        assert_eq!(lookup(&mut alloc, &prompt, Some(3), 10), chain);
        assert_eq!(lookup(&mut alloc, &prompt, Some(3), 9), chain);
        assert_eq!(lookup(&mut alloc, &prompt, Some(3), 7), chain[..1]);
        assert_eq!(lookup(&mut alloc, &prompt[..7], Some(3), 10), chain[..1]);
        assert_eq!(lookup(&mut alloc, &prompt[..3], Some(3), 10), NONE);
        assert_eq!(
            lookup(&mut alloc, &prompt, None, 10),
            NONE,
            "another adapter"
        );
        assert_eq!(
            lookup(&mut alloc, &prompt, Some(4), 10),
            NONE,
            "another adapter"
        );
        let mut other = prompt.clone();
        other[5] = 99;
        assert_eq!(lookup(&mut alloc, &other, Some(3), 10), chain[..1]);
        other[0] = 99;
        assert_eq!(
            lookup(&mut alloc, &other, Some(3), 10),
            NONE,
            "the chain starts over"
        );
        // The same second block after another first block is another prefix.
        let mut shifted = prompt.clone();
        shifted[..4].copy_from_slice(&[7, 7, 7, 7]);
        register_chain(&mut alloc, &shifted[..4], Some(3));
        assert_eq!(lookup(&mut alloc, &shifted, Some(3), 10).len(), 1);
        alloc.assert_consistent();
    }

    #[test]
    fn a_hash_collision_never_shares_a_block() {
        let mut alloc = BlockAllocator::new(4, 2);
        let a = alloc.allocate().unwrap();
        let id_a = alloc.register_full_block(a, None, &[1, 2], None);
        // Forge a collision: the key of [3, 4] now leads to the block holding [1, 2].
        let forged = prefix_key(None, &[3, 4], None);
        alloc.by_key.insert(forged, a);
        assert_eq!(alloc.lookup_prefix(&[3, 4], None, 2).blocks, NONE);
        assert_eq!(alloc.refcount(a), 1);
        // Registering [3, 4] while its key is taken leaves it private and a's entry intact.
        let b = alloc.allocate().unwrap();
        let id_b = alloc.register_full_block(b, None, &[3, 4], None);
        assert_ne!(id_a, id_b);
        assert!(alloc.blocks[b as usize].registration.is_none());
        alloc.by_key.remove(&forged);
        assert_eq!(alloc.lookup_prefix(&[1, 2], None, 2).blocks, [a]);
        alloc.release(a);
        // The same tokens under another adapter, or after another parent, are other content.
        let forged = prefix_key(None, &[1, 2], Some(9));
        alloc.by_key.insert(forged, a);
        assert_eq!(alloc.lookup_prefix(&[1, 2], Some(9), 2).blocks, NONE);
        alloc.by_key.remove(&forged);
        let c = alloc.allocate().unwrap();
        alloc.register_full_block(c, Some(id_a), &[5, 6], None);
        let forged = prefix_key(None, &[5, 6], None);
        alloc.by_key.insert(forged, c);
        assert_eq!(alloc.lookup_prefix(&[5, 6], None, 2).blocks, NONE);
        alloc.by_key.remove(&forged);
        assert_eq!(alloc.refcount(c), 1);
        alloc.assert_consistent();
    }

    #[test]
    fn registering_a_known_prefix_twice_keeps_the_first_block() {
        let mut alloc = BlockAllocator::new(4, 2);
        let a = alloc.allocate().unwrap();
        let b = alloc.allocate().unwrap();
        let id_a = alloc.register_full_block(a, None, &[1, 2], None);
        assert_eq!(alloc.register_full_block(b, None, &[1, 2], None), id_a);
        alloc.release(b);
        alloc.release(a);
        // b was never registered: it is handed out before the cached a.
        assert_eq!(alloc.allocate(), Some(b));
        alloc.assert_consistent();
    }

    #[test]
    fn eviction_takes_never_registered_blocks_first_then_the_least_recently_released() {
        let mut alloc = BlockAllocator::new(4, 2);
        let [a, b, c, d] = [(); 4].map(|_| alloc.allocate().unwrap());
        let id_a = alloc.register_full_block(a, None, &[1, 1], None);
        alloc.register_full_block(b, Some(id_a), &[2, 2], None);
        alloc.register_full_block(c, None, &[3, 3], None);
        for block in [c, a, d, b] {
            alloc.release(block);
        }
        assert_eq!(alloc.num_used(), 0);
        assert_eq!(alloc.allocate(), Some(d), "never registered first");
        assert_eq!(alloc.allocate(), Some(c), "then the oldest release");
        assert_eq!(
            alloc.lookup_prefix(&[3, 3], None, 2).blocks,
            NONE,
            "c was evicted"
        );
        // Reviving a moves it out of the eviction order; a later release puts it last.
        assert_eq!(alloc.lookup_prefix(&[1, 1, 2, 2], None, 4).blocks, [a, b]);
        alloc.release(a);
        alloc.release(b);
        assert_eq!(alloc.allocate(), Some(a));
        assert_eq!(alloc.allocate(), Some(b));
        assert_eq!(alloc.allocate(), None);
        alloc.assert_consistent();
        for block in [a, b, c, d] {
            alloc.release(block);
        }
        assert_eq!(alloc.num_used(), 0);
        alloc.assert_consistent();
    }
}
