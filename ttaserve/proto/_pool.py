"""The descriptor pool of ttaserve's generated protobuf code.

The inference API reuses Triton's package and message names (that is the wire contract),
so tritonclient's generated copy and ours would collide in protobuf's default pool. Our
stubs register into this private pool instead; server and stock client can then share a
process (tests, embedded use)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
