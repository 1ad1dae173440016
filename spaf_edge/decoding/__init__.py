"""Torch-free decoding core: the loop, its proposers, trees and acceptance (DESIGN §4, §4b)."""
