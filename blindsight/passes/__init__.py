"""Graph passes: find attention cores, rewrite them into BlindSightAttention, lower the op."""
