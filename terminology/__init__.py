"""Terminology tables (data): UCUM, pinyin syllables, Chinese surname readings."""
