"""Writes routing_eval.jsonl, the labelled set of kvserve/bench/routing_eval.py, from the items below.

    .venv/bin/python kvserve/bench/data/make_routing_eval.py

Every item was written for this project. Code items carry a reference solution (tests/unit/
test_routing_eval.py runs it against the item's tests in the grading sandbox). Arithmetic answers
are never typed in: a plain question is its own expression, evaluated exactly with fractions, and a
word problem fills its numbers into the text and computes the answer from the same numbers. The
`difficulty` of an item is the author's estimate, not a measurement.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import textwrap
from fractions import Fraction
from pathlib import Path

OUT = Path(__file__).with_name("routing_eval.jsonl")
CODE_SUFFIX = "Reply with only the code in one ```python block."
NUMBER_SUFFIX = "Answer with just the number."


# ---------------------------------------------------------------------------------------------- code

def code(difficulty: str, signature: str, description: str, tests: str, reference: str) -> dict:
    return {"kind": "code", "difficulty": difficulty,
            "prompt": f"Write a Python function `{signature}` that {description} {CODE_SUFFIX}",
            "entry_point": signature.split("(")[0],
            "tests": textwrap.dedent(tests).strip() + "\n",
            "reference": textwrap.dedent(reference).strip() + "\n"}


CODE = [
    # ---- easy
    code("easy", "sum_list(nums: list[int]) -> int", "returns the sum of the numbers (0 for an empty list).", """
        assert sum_list([1, 2, 3]) == 6
        assert sum_list([]) == 0
        assert sum_list([-5, 5, 10]) == 10
        """, """
        def sum_list(nums: list[int]) -> int:
            return sum(nums)
        """),
    code("easy", "reverse_string(s: str) -> str", "returns s reversed.", """
        assert reverse_string("abc") == "cba"
        assert reverse_string("") == ""
        assert reverse_string("Hello, World!") == "!dlroW ,olleH"
        """, """
        def reverse_string(s: str) -> str:
            return s[::-1]
        """),
    code("easy", "max_of_three(a: int, b: int, c: int) -> int", "returns the largest of the three numbers.", """
        assert max_of_three(1, 2, 3) == 3
        assert max_of_three(3, 2, 1) == 3
        assert max_of_three(-1, -5, -3) == -1
        assert max_of_three(4, 4, 2) == 4
        """, """
        def max_of_three(a: int, b: int, c: int) -> int:
            return max(a, b, c)
        """),
    code("easy", "is_even(n: int) -> bool", "returns True if n is even and False otherwise.", """
        assert is_even(4) is True
        assert is_even(7) is False
        assert is_even(0) is True
        assert is_even(-3) is False
        """, """
        def is_even(n: int) -> bool:
            return n % 2 == 0
        """),
    code("easy", "count_vowels(s: str) -> int",
         "returns how many characters of s are vowels (a, e, i, o, u, in either case).", """
        assert count_vowels("hello") == 2
        assert count_vowels("AEIOU xyz") == 5
        assert count_vowels("") == 0
        assert count_vowels("rhythm") == 0
        """, """
        def count_vowels(s: str) -> int:
            return sum(1 for ch in s.lower() if ch in "aeiou")
        """),
    code("easy", "factorial(n: int) -> int", "returns n! for n >= 0 (0! is 1).", """
        assert factorial(0) == 1
        assert factorial(1) == 1
        assert factorial(5) == 120
        assert factorial(20) == 2432902008176640000
        """, """
        def factorial(n: int) -> int:
            result = 1
            for k in range(2, n + 1):
                result *= k
            return result
        """),
    code("easy", "celsius_to_fahrenheit(c: float) -> float",
         "converts a temperature from degrees Celsius to degrees Fahrenheit.", """
        assert abs(celsius_to_fahrenheit(0) - 32) < 1e-9
        assert abs(celsius_to_fahrenheit(100) - 212) < 1e-9
        assert abs(celsius_to_fahrenheit(-40) - -40) < 1e-9
        assert abs(celsius_to_fahrenheit(37) - 98.6) < 1e-9
        """, """
        def celsius_to_fahrenheit(c: float) -> float:
            return c * 9 / 5 + 32
        """),
    code("easy", "square_all(nums: list[int]) -> list[int]",
         "returns a new list with every number squared, in the same order.", """
        assert square_all([1, 2, 3]) == [1, 4, 9]
        assert square_all([]) == []
        assert square_all([-2, 0]) == [4, 0]
        """, """
        def square_all(nums: list[int]) -> list[int]:
            return [n * n for n in nums]
        """),
    code("easy", "is_palindrome(s: str) -> bool",
         "returns True if s reads the same forwards and backwards, comparing characters exactly (case-sensitive).", """
        assert is_palindrome("racecar") is True
        assert is_palindrome("abba") is True
        assert is_palindrome("") is True
        assert is_palindrome("abc") is False
        assert is_palindrome("Aba") is False
        """, """
        def is_palindrome(s: str) -> bool:
            return s == s[::-1]
        """),
    code("easy", "average(nums: list[float]) -> float",
         "returns the arithmetic mean of nums, or 0.0 for an empty list.", """
        assert average([1, 2, 3, 4]) == 2.5
        assert average([]) == 0.0
        assert average([5]) == 5
        assert average([-1, 1]) == 0
        """, """
        def average(nums: list[float]) -> float:
            return sum(nums) / len(nums) if nums else 0.0
        """),
    code("easy", "filter_positive(nums: list[int]) -> list[int]",
         "returns the numbers that are greater than zero, keeping their order.", """
        assert filter_positive([3, -1, 0, 5, -7, 2]) == [3, 5, 2]
        assert filter_positive([]) == []
        assert filter_positive([-1, 0]) == []
        """, """
        def filter_positive(nums: list[int]) -> list[int]:
            return [n for n in nums if n > 0]
        """),
    code("easy", "fizzbuzz(n: int) -> list[str]",
         'returns a list for the numbers 1 to n where multiples of 3 become "Fizz", multiples of 5 "Buzz", '
         'multiples of both "FizzBuzz", and other numbers their decimal string.', """
        assert fizzbuzz(5) == ["1", "2", "Fizz", "4", "Buzz"]
        assert fizzbuzz(15)[-1] == "FizzBuzz"
        assert fizzbuzz(15)[8] == "Fizz"
        assert fizzbuzz(0) == []
        """, """
        def fizzbuzz(n: int) -> list[str]:
            out = []
            for i in range(1, n + 1):
                word = ("Fizz" if i % 3 == 0 else "") + ("Buzz" if i % 5 == 0 else "")
                out.append(word or str(i))
            return out
        """),
    code("easy", "index_of_min(nums: list[int]) -> int",
         "returns the index of the smallest element of the non-empty list nums (the first one if it occurs "
         "more than once).", """
        assert index_of_min([3, 1, 2]) == 1
        assert index_of_min([5]) == 0
        assert index_of_min([2, 1, 1]) == 1
        assert index_of_min([-1, -1]) == 0
        """, """
        def index_of_min(nums: list[int]) -> int:
            return nums.index(min(nums))
        """),
    code("easy", "capitalize_words(s: str) -> str",
         "uppercases the first character of every space-separated word in s and leaves all other "
         "characters unchanged.", """
        assert capitalize_words("hello world") == "Hello World"
        assert capitalize_words("abc dEF") == "Abc DEF"
        assert capitalize_words("x") == "X"
        assert capitalize_words("") == ""
        """, """
        def capitalize_words(s: str) -> str:
            return " ".join(word[:1].upper() + word[1:] for word in s.split(" "))
        """),
    code("easy", "gcd(a: int, b: int) -> int",
         "returns the greatest common divisor of two non-negative integers (gcd(0, 0) is 0).", """
        assert gcd(12, 18) == 6
        assert gcd(17, 5) == 1
        assert gcd(0, 9) == 9
        assert gcd(0, 0) == 0
        assert gcd(100, 75) == 25
        """, """
        def gcd(a: int, b: int) -> int:
            while b:
                a, b = b, a % b
            return a
        """),
    code("easy", "is_leap_year(year: int) -> bool",
         "returns True if year is a leap year in the Gregorian calendar.", """
        assert is_leap_year(2024) is True
        assert is_leap_year(2000) is True
        assert is_leap_year(1900) is False
        assert is_leap_year(2023) is False
        assert is_leap_year(2100) is False
        """, """
        def is_leap_year(year: int) -> bool:
            return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        """),
    code("easy", "digit_sum(n: int) -> int", "returns the sum of the decimal digits of n, ignoring its sign.", """
        assert digit_sum(123) == 6
        assert digit_sum(-45) == 9
        assert digit_sum(0) == 0
        assert digit_sum(9999) == 36
        """, """
        def digit_sum(n: int) -> int:
            return sum(int(d) for d in str(abs(n)))
        """),
    code("easy", "remove_duplicates(items: list) -> list",
         "returns the items without repeats, keeping the first occurrence of each in the original order.", """
        assert remove_duplicates([3, 1, 3, 2, 1]) == [3, 1, 2]
        assert remove_duplicates([]) == []
        assert remove_duplicates(["a", "a"]) == ["a"]
        """, """
        def remove_duplicates(items: list) -> list:
            seen = []
            for item in items:
                if item not in seen:
                    seen.append(item)
            return seen
        """),
    code("easy", "count_words(s: str) -> int",
         "returns the number of words in s, where words are separated by any amount of whitespace.", """
        assert count_words("hello world") == 2
        assert count_words("  many   spaces here ") == 3
        assert count_words("") == 0
        assert count_words("tab\\tand\\nnewline") == 3
        """, """
        def count_words(s: str) -> int:
            return len(s.split())
        """),
    code("easy", "clamp(x: int, low: int, high: int) -> int",
         "returns x limited to the range low..high (low <= high).", """
        assert clamp(5, 0, 10) == 5
        assert clamp(-3, 0, 10) == 0
        assert clamp(42, 0, 10) == 10
        assert clamp(7, 7, 7) == 7
        """, """
        def clamp(x: int, low: int, high: int) -> int:
            return max(low, min(x, high))
        """),

    # ---- medium
    code("medium", "run_length_encode(s: str) -> str",
         'writes each run of identical characters as the character followed by the run length, '
         'e.g. "aaab" -> "a3b1".', """
        assert run_length_encode("aaabcc") == "a3b1c2"
        assert run_length_encode("") == ""
        assert run_length_encode("a") == "a1"
        assert run_length_encode("aaaaaaaaaaaa") == "a12"
        assert run_length_encode("abab") == "a1b1a1b1"
        """, """
        def run_length_encode(s: str) -> str:
            out = []
            i = 0
            while i < len(s):
                j = i
                while j < len(s) and s[j] == s[i]:
                    j += 1
                out.append(f"{s[i]}{j - i}")
                i = j
            return "".join(out)
        """),
    code("medium", "run_length_decode(s: str) -> str",
         'decodes a string of letters each followed by a repeat count of one or more digits, '
         'e.g. "a3b2" -> "aaabb".', """
        assert run_length_decode("a3b2") == "aaabb"
        assert run_length_decode("") == ""
        assert run_length_decode("x12") == "x" * 12
        assert run_length_decode("a1b1c1") == "abc"
        assert run_length_decode("z10y1") == "z" * 10 + "y"
        """, """
        import re

        def run_length_decode(s: str) -> str:
            return "".join(ch * int(count) for ch, count in re.findall(r"([A-Za-z])(\\d+)", s))
        """),
    code("medium", "is_balanced(s: str) -> bool",
         "returns True if the brackets (), [] and {} in s are balanced and properly nested; other "
         "characters are ignored.", """
        assert is_balanced("([]{})") is True
        assert is_balanced("a(b[c]d)e") is True
        assert is_balanced("") is True
        assert is_balanced("{[()()]}") is True
        assert is_balanced("([)]") is False
        assert is_balanced("((") is False
        assert is_balanced(")(") is False
        assert is_balanced("}") is False
        """, """
        def is_balanced(s: str) -> bool:
            pairs = {")": "(", "]": "[", "}": "{"}
            stack = []
            for ch in s:
                if ch in "([{":
                    stack.append(ch)
                elif ch in pairs:
                    if not stack or stack.pop() != pairs[ch]:
                        return False
            return not stack
        """),
    code("medium", "int_to_roman(n: int) -> str",
         'converts an integer from 1 to 3999 to a Roman numeral in standard form (e.g. 4 -> "IV").', """
        assert int_to_roman(1) == "I"
        assert int_to_roman(4) == "IV"
        assert int_to_roman(9) == "IX"
        assert int_to_roman(14) == "XIV"
        assert int_to_roman(40) == "XL"
        assert int_to_roman(90) == "XC"
        assert int_to_roman(400) == "CD"
        assert int_to_roman(1994) == "MCMXCIV"
        assert int_to_roman(2024) == "MMXXIV"
        assert int_to_roman(3999) == "MMMCMXCIX"
        """, """
        def int_to_roman(n: int) -> str:
            table = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
                     (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
            out = []
            for value, symbol in table:
                while n >= value:
                    out.append(symbol)
                    n -= value
            return "".join(out)
        """),
    code("medium", "roman_to_int(s: str) -> int", 'converts a valid Roman numeral such as "MCMXCIV" to an integer.', """
        assert roman_to_int("III") == 3
        assert roman_to_int("IV") == 4
        assert roman_to_int("XLII") == 42
        assert roman_to_int("LVIII") == 58
        assert roman_to_int("MCMXCIV") == 1994
        assert roman_to_int("MMMCMXCIX") == 3999
        """, """
        def roman_to_int(s: str) -> int:
            values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
            total = 0
            for i, ch in enumerate(s):
                if i + 1 < len(s) and values[ch] < values[s[i + 1]]:
                    total -= values[ch]
                else:
                    total += values[ch]
            return total
        """),
    code("medium", "merge_intervals(intervals: list[list[int]]) -> list[list[int]]",
         "merges [start, end] intervals that overlap or share an endpoint and returns the result sorted "
         "by start.", """
        assert merge_intervals([[1, 3], [2, 6], [8, 10], [15, 18]]) == [[1, 6], [8, 10], [15, 18]]
        assert merge_intervals([[1, 4], [4, 5]]) == [[1, 5]]
        assert merge_intervals([]) == []
        assert merge_intervals([[5, 6], [1, 2]]) == [[1, 2], [5, 6]]
        assert merge_intervals([[1, 10], [2, 3], [4, 5]]) == [[1, 10]]
        assert merge_intervals([[1, 2], [3, 4]]) == [[1, 2], [3, 4]]
        """, """
        def merge_intervals(intervals: list[list[int]]) -> list[list[int]]:
            merged = []
            for start, end in sorted(intervals):
                if merged and start <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            return merged
        """),
    code("medium", "is_anagram(a: str, b: str) -> bool",
         "returns True if a and b contain the same letters in some order, ignoring case and spaces.", """
        assert is_anagram("listen", "silent") is True
        assert is_anagram("Dormitory", "dirty room") is True
        assert is_anagram("", "") is True
        assert is_anagram("abc", "abd") is False
        assert is_anagram("aab", "abb") is False
        """, """
        def is_anagram(a: str, b: str) -> bool:
            def key(s):
                return sorted(s.replace(" ", "").lower())
            return key(a) == key(b)
        """),
    code("medium", "is_sentence_palindrome(s: str) -> bool",
         "returns True if s is a palindrome once only its letters and digits are kept and case is ignored.", """
        assert is_sentence_palindrome("A man, a plan, a canal: Panama") is True
        assert is_sentence_palindrome("No 'x' in Nixon") is True
        assert is_sentence_palindrome("12 3 21") is True
        assert is_sentence_palindrome("") is True
        assert is_sentence_palindrome("race a car") is False
        assert is_sentence_palindrome("ab") is False
        """, """
        def is_sentence_palindrome(s: str) -> bool:
            kept = [ch.lower() for ch in s if ch.isalnum()]
            return kept == kept[::-1]
        """),
    code("medium", "two_sum(nums: list[int], target: int) -> tuple[int, int]",
         "returns the indices (i, j), i < j, of the one pair of elements with nums[i] + nums[j] == target.", """
        assert tuple(two_sum([2, 7, 11, 15], 9)) == (0, 1)
        assert tuple(two_sum([3, 2, 4], 6)) == (1, 2)
        assert tuple(two_sum([3, 3], 6)) == (0, 1)
        assert tuple(two_sum([-4, 10, 0, 7], 3)) == (0, 3)
        """, """
        def two_sum(nums: list[int], target: int) -> tuple[int, int]:
            seen = {}
            for j, n in enumerate(nums):
                if target - n in seen:
                    return (seen[target - n], j)
                seen.setdefault(n, j)
            raise ValueError("no pair")
        """),
    code("medium", "binary_search(nums: list[int], target: int) -> int",
         "returns the index of target in nums, a sorted list of distinct integers, or -1 if it is absent.", """
        assert binary_search([1, 3, 5, 7, 9], 7) == 3
        assert binary_search([1, 3, 5, 7, 9], 1) == 0
        assert binary_search([1, 3, 5, 7, 9], 9) == 4
        assert binary_search([1, 3, 5, 7, 9], 4) == -1
        assert binary_search([], 1) == -1
        assert binary_search(list(range(0, 1000, 2)), 998) == 499
        """, """
        def binary_search(nums: list[int], target: int) -> int:
            lo, hi = 0, len(nums) - 1
            while lo <= hi:
                mid = (lo + hi) // 2
                if nums[mid] == target:
                    return mid
                if nums[mid] < target:
                    lo = mid + 1
                else:
                    hi = mid - 1
            return -1
        """),
    code("medium", "flatten(nested: list) -> list",
         "flattens arbitrarily nested lists into one list of the non-list elements, in order.", """
        assert flatten([1, [2, [3, [4]], 5]]) == [1, 2, 3, 4, 5]
        assert flatten([]) == []
        assert flatten([[], [[]]]) == []
        assert flatten(["a", ["b"], "c"]) == ["a", "b", "c"]
        """, """
        def flatten(nested: list) -> list:
            out = []
            for item in nested:
                if isinstance(item, list):
                    out.extend(flatten(item))
                else:
                    out.append(item)
            return out
        """),
    code("medium", "caesar_shift(text: str, shift: int) -> str",
         "shifts every ASCII letter by shift places in the alphabet, wrapping around and keeping its case; "
         "other characters are unchanged. shift may be negative or above 26.", """
        assert caesar_shift("abc", 1) == "bcd"
        assert caesar_shift("xyz", 3) == "abc"
        assert caesar_shift("Hello, World!", 5) == "Mjqqt, Btwqi!"
        assert caesar_shift("abc", -1) == "zab"
        assert caesar_shift("abc", 27) == "bcd"
        assert caesar_shift("", 5) == ""
        """, """
        def caesar_shift(text: str, shift: int) -> str:
            out = []
            for ch in text:
                if "a" <= ch <= "z":
                    out.append(chr((ord(ch) - 97 + shift) % 26 + 97))
                elif "A" <= ch <= "Z":
                    out.append(chr((ord(ch) - 65 + shift) % 26 + 65))
                else:
                    out.append(ch)
            return "".join(out)
        """),
    code("medium", "word_counts(text: str) -> dict[str, int]",
         "counts words case-insensitively, a word being a maximal run of the letters a-z, and returns a "
         "dict of lowercase word -> count.", """
        assert word_counts("The cat and the hat.") == {"the": 2, "cat": 1, "and": 1, "hat": 1}
        assert word_counts("") == {}
        assert word_counts("Go, go GO!") == {"go": 3}
        assert word_counts("it's a1b") == {"it": 1, "s": 1, "a": 1, "b": 1}
        """, """
        import re

        def word_counts(text: str) -> dict[str, int]:
            counts = {}
            for word in re.findall(r"[a-z]+", text.lower()):
                counts[word] = counts.get(word, 0) + 1
            return counts
        """),
    code("medium", "second_largest(nums: list[int]) -> int | None",
         "returns the second largest distinct value in nums, or None if it has fewer than two distinct values.", """
        assert second_largest([3, 1, 4, 1, 5]) == 4
        assert second_largest([2, 1]) == 1
        assert second_largest([-1, -2, -3]) == -2
        assert second_largest([7, 7, 3]) == 3
        assert second_largest([5, 5, 5]) is None
        assert second_largest([]) is None
        """, """
        def second_largest(nums: list[int]) -> int | None:
            distinct = sorted(set(nums))
            return distinct[-2] if len(distinct) >= 2 else None
        """),
    code("medium", "is_prime(n: int) -> bool", "returns True if n is a prime number (n may be any integer).", """
        assert is_prime(2) is True
        assert is_prime(97) is True
        assert is_prime(7919) is True
        assert is_prime(1000003) is True
        assert is_prime(1) is False
        assert is_prime(0) is False
        assert is_prime(-7) is False
        assert is_prime(91) is False
        """, """
        def is_prime(n: int) -> bool:
            if n < 2:
                return False
            k = 2
            while k * k <= n:
                if n % k == 0:
                    return False
                k += 1
            return True
        """),
    code("medium", "primes_up_to(n: int) -> list[int]",
         "returns all primes p with 2 <= p <= n in increasing order; it must be fast for n = 100000.", """
        assert primes_up_to(10) == [2, 3, 5, 7]
        assert primes_up_to(1) == []
        assert primes_up_to(2) == [2]
        assert primes_up_to(30)[-1] == 29
        assert len(primes_up_to(100)) == 25
        assert len(primes_up_to(100000)) == 9592
        """, """
        def primes_up_to(n: int) -> list[int]:
            if n < 2:
                return []
            sieve = [True] * (n + 1)
            sieve[0] = sieve[1] = False
            for p in range(2, int(n ** 0.5) + 1):
                if sieve[p]:
                    sieve[p * p::p] = [False] * len(range(p * p, n + 1, p))
            return [p for p, is_p in enumerate(sieve) if is_p]
        """),
    code("medium", "fibonacci(n: int) -> int",
         "returns the n-th Fibonacci number, where fibonacci(0) == 0 and fibonacci(1) == 1; it must be fast "
         "for n up to 90.", """
        assert fibonacci(0) == 0
        assert fibonacci(1) == 1
        assert fibonacci(2) == 1
        assert fibonacci(10) == 55
        assert fibonacci(50) == 12586269025
        assert fibonacci(90) == 2880067194370816120
        """, """
        def fibonacci(n: int) -> int:
            a, b = 0, 1
            for _ in range(n):
                a, b = b, a + b
            return a
        """),
    code("medium", "longest_common_prefix(words: list[str]) -> str",
         'returns the longest string that is a prefix of every word ("" for an empty list).', """
        assert longest_common_prefix(["flower", "flow", "flight"]) == "fl"
        assert longest_common_prefix(["dog", "car"]) == ""
        assert longest_common_prefix([]) == ""
        assert longest_common_prefix(["same", "same"]) == "same"
        assert longest_common_prefix(["ab", "a"]) == "a"
        """, """
        def longest_common_prefix(words: list[str]) -> str:
            if not words:
                return ""
            prefix = words[0]
            for word in words[1:]:
                while not word.startswith(prefix):
                    prefix = prefix[:-1]
            return prefix
        """),
    code("medium", "rotate_right(items: list, k: int) -> list",
         "returns a new list with items rotated right by k positions (k >= 0, possibly larger than the length).", """
        assert rotate_right([1, 2, 3, 4, 5], 2) == [4, 5, 1, 2, 3]
        assert rotate_right([1, 2, 3], 3) == [1, 2, 3]
        assert rotate_right([1, 2, 3], 4) == [3, 1, 2]
        assert rotate_right([], 5) == []
        assert rotate_right([1], 0) == [1]
        """, """
        def rotate_right(items: list, k: int) -> list:
            if not items:
                return []
            k %= len(items)
            return items[len(items) - k:] + items[:len(items) - k]
        """),
    code("medium", "max_subarray_sum(nums: list[int]) -> int",
         "returns the largest sum of a non-empty contiguous run of elements of the non-empty list nums.", """
        assert max_subarray_sum([-2, 1, -3, 4, -1, 2, 1, -5, 4]) == 6
        assert max_subarray_sum([-3, -1, -2]) == -1
        assert max_subarray_sum([5]) == 5
        assert max_subarray_sum([1, 2, 3]) == 6
        assert max_subarray_sum([2, -1, 2]) == 3
        """, """
        def max_subarray_sum(nums: list[int]) -> int:
            best = current = nums[0]
            for n in nums[1:]:
                current = max(n, current + n)
                best = max(best, current)
            return best
        """),
    code("medium", "pascal_row(n: int) -> list[int]",
         "returns row n of Pascal's triangle, where row 0 is [1] and row 2 is [1, 2, 1].", """
        assert pascal_row(0) == [1]
        assert pascal_row(1) == [1, 1]
        assert pascal_row(4) == [1, 4, 6, 4, 1]
        assert pascal_row(10)[5] == 252
        assert len(pascal_row(30)) == 31
        """, """
        def pascal_row(n: int) -> list[int]:
            row = [1]
            for _ in range(n):
                row = [a + b for a, b in zip([0] + row, row + [0])]
            return row
        """),
    code("medium", "matrix_multiply(a: list[list[int]], b: list[list[int]]) -> list[list[int]]",
         "returns the matrix product of a and b (the inner dimensions match).", """
        assert matrix_multiply([[1, 2], [3, 4]], [[5, 6], [7, 8]]) == [[19, 22], [43, 50]]
        assert matrix_multiply([[1, 2, 3]], [[1], [2], [3]]) == [[14]]
        assert matrix_multiply([[2]], [[3]]) == [[6]]
        assert matrix_multiply([[1], [2]], [[3, 4]]) == [[3, 4], [6, 8]]
        """, """
        def matrix_multiply(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
            return [[sum(x * y for x, y in zip(row, column)) for column in zip(*b)] for row in a]
        """),
    code("medium", "is_valid_ipv4(s: str) -> bool",
         'returns True if s is an IPv4 address: four dot-separated parts of digits only, each 0-255, '
         'without leading zeros (except "0" itself).', """
        assert is_valid_ipv4("192.168.0.1") is True
        assert is_valid_ipv4("255.255.255.255") is True
        assert is_valid_ipv4("0.0.0.0") is True
        assert is_valid_ipv4("256.1.1.1") is False
        assert is_valid_ipv4("1.2.3") is False
        assert is_valid_ipv4("1.2.3.4.5") is False
        assert is_valid_ipv4("01.2.3.4") is False
        assert is_valid_ipv4("a.b.c.d") is False
        assert is_valid_ipv4("1.2.3.-4") is False
        assert is_valid_ipv4("1..2.3") is False
        assert is_valid_ipv4(" 1.2.3.4") is False
        assert is_valid_ipv4("") is False
        """, """
        def is_valid_ipv4(s: str) -> bool:
            parts = s.split(".")
            if len(parts) != 4:
                return False
            for part in parts:
                if not part or not all("0" <= ch <= "9" for ch in part):
                    return False
                if len(part) > 1 and part[0] == "0":
                    return False
                if int(part) > 255:
                    return False
            return True
        """),
    code("medium", "group_anagrams(words: list[str]) -> list[list[str]]",
         "groups words that are anagrams of each other, with the words of each group sorted and the groups "
         "sorted by their first word.", """
        _t_words = ["eat", "tea", "tan", "ate", "nat", "bat"]
        assert group_anagrams(_t_words) == [["ate", "eat", "tea"], ["bat"], ["nat", "tan"]]
        assert group_anagrams([]) == []
        assert group_anagrams(["a"]) == [["a"]]
        assert group_anagrams(["ab", "ba", "ab"]) == [["ab", "ab", "ba"]]
        """, """
        def group_anagrams(words: list[str]) -> list[list[str]]:
            groups = {}
            for word in words:
                groups.setdefault("".join(sorted(word)), []).append(word)
            return sorted(sorted(group) for group in groups.values())
        """),
    code("medium", "to_base(n: int, base: int) -> str",
         'writes the integer n in the given base (2 to 36) with digits 0-9 then A-Z, and a leading "-" '
         'for negative n.', """
        assert to_base(255, 16) == "FF"
        assert to_base(0, 2) == "0"
        assert to_base(-10, 2) == "-1010"
        assert to_base(35, 36) == "Z"
        assert to_base(36, 36) == "10"
        assert to_base(100, 7) == "202"
        """, """
        def to_base(n: int, base: int) -> str:
            digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
            if n == 0:
                return "0"
            sign, n = ("-", -n) if n < 0 else ("", n)
            out = []
            while n:
                n, r = divmod(n, base)
                out.append(digits[r])
            return sign + "".join(reversed(out))
        """),
    code("medium", "compare_versions(a: str, b: str) -> int",
         'compares dotted version strings like "1.10.2" number by number (missing parts count as 0) and '
         'returns -1, 0 or 1.', """
        assert compare_versions("1.2.10", "1.2.9") == 1
        assert compare_versions("1.0", "1") == 0
        assert compare_versions("0.9", "1.0") == -1
        assert compare_versions("2.0.1", "2.0.1") == 0
        assert compare_versions("1.0.0.1", "1") == 1
        assert compare_versions("1.2", "1.10") == -1
        """, """
        def compare_versions(a: str, b: str) -> int:
            x = [int(p) for p in a.split(".")]
            y = [int(p) for p in b.split(".")]
            width = max(len(x), len(y))
            x += [0] * (width - len(x))
            y += [0] * (width - len(y))
            return (x > y) - (x < y)
        """),
    code("medium", "format_duration(seconds: int) -> str",
         'formats a non-negative number of seconds as hours, minutes and seconds like "1h 2m 5s", leaving '
         'out zero parts ("0s" for 0).', """
        assert format_duration(3725) == "1h 2m 5s"
        assert format_duration(0) == "0s"
        assert format_duration(60) == "1m"
        assert format_duration(3600) == "1h"
        assert format_duration(3601) == "1h 1s"
        assert format_duration(59) == "59s"
        assert format_duration(90061) == "25h 1m 1s"
        """, """
        def format_duration(seconds: int) -> str:
            hours, rest = divmod(seconds, 3600)
            minutes, secs = divmod(rest, 60)
            parts = [f"{v}{u}" for v, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if v]
            return " ".join(parts) or "0s"
        """),
    code("medium", "rpn_eval(tokens: list[str]) -> int",
         "evaluates a reverse Polish notation expression of integers and + - * /, where / is integer "
         "division truncating toward zero.", """
        assert rpn_eval(["2", "1", "+", "3", "*"]) == 9
        assert rpn_eval(["3", "4", "-"]) == -1
        assert rpn_eval(["5"]) == 5
        assert rpn_eval(["2", "3", "4", "*", "+", "5", "-"]) == 9
        assert rpn_eval(["7", "-2", "/"]) == -3
        assert rpn_eval(["-7", "2", "/", "1", "+"]) == -2
        """, """
        def rpn_eval(tokens: list[str]) -> int:
            stack = []
            for token in tokens:
                if token in ("+", "-", "*", "/"):
                    b, a = stack.pop(), stack.pop()
                    if token == "+":
                        stack.append(a + b)
                    elif token == "-":
                        stack.append(a - b)
                    elif token == "*":
                        stack.append(a * b)
                    else:
                        q = abs(a) // abs(b)
                        stack.append(q if (a >= 0) == (b >= 0) else -q)
                else:
                    stack.append(int(token))
            return stack[-1]
        """),

    # ---- hard
    code("hard", "edit_distance(a: str, b: str) -> int",
         "returns the Levenshtein distance between a and b: the fewest single-character insertions, "
         "deletions and substitutions that turn a into b.", """
        assert edit_distance("kitten", "sitting") == 3
        assert edit_distance("", "abc") == 3
        assert edit_distance("abc", "abc") == 0
        assert edit_distance("flaw", "lawn") == 2
        assert edit_distance("intention", "execution") == 5
        assert edit_distance("abcdef", "azced") == 3
        """, """
        def edit_distance(a: str, b: str) -> int:
            prev = list(range(len(b) + 1))
            for i, ca in enumerate(a, 1):
                cur = [i]
                for j, cb in enumerate(b, 1):
                    cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
                prev = cur
            return prev[-1]
        """),
    code("hard", "lcs_length(a: str, b: str) -> int",
         "returns the length of the longest common subsequence of a and b.", """
        assert lcs_length("abcde", "ace") == 3
        assert lcs_length("abc", "def") == 0
        assert lcs_length("", "x") == 0
        assert lcs_length("AGGTAB", "GXTXAYB") == 4
        assert lcs_length("aaaa", "aa") == 2
        assert lcs_length("a" * 300, "a" * 300) == 300
        """, """
        def lcs_length(a: str, b: str) -> int:
            prev = [0] * (len(b) + 1)
            for ca in a:
                cur = [0]
                for j, cb in enumerate(b, 1):
                    cur.append(prev[j - 1] + 1 if ca == cb else max(prev[j], cur[j - 1]))
                prev = cur
            return prev[-1]
        """),
    code("hard", "topo_sort(deps: dict[str, list[str]]) -> list[str]",
         "orders all tasks in deps (keys and values) so each follows its prerequisites deps[task]; among ready "
         "tasks take the alphabetically first; raise ValueError on a cycle.", """
        assert topo_sort({"b": ["a"], "c": ["a", "b"]}) == ["a", "b", "c"]
        assert topo_sort({"x": [], "a": []}) == ["a", "x"]
        assert topo_sort({"d": ["b", "c"], "b": ["a"], "c": ["a"]}) == ["a", "b", "c", "d"]
        assert topo_sort({"c": ["z"], "a": []}) == ["a", "z", "c"]
        assert topo_sort({}) == []
        for _t_cyclic in ({"a": ["b"], "b": ["a"]}, {"a": ["a"]}, {"a": ["c"], "b": ["a"], "c": ["b"]}):
            try:
                topo_sort(_t_cyclic)
            except ValueError:
                pass
            else:
                raise AssertionError(f"no ValueError for {_t_cyclic}")
        """, """
        import heapq

        def topo_sort(deps: dict[str, list[str]]) -> list[str]:
            tasks = set(deps) | {d for ds in deps.values() for d in ds}
            waiting = {t: set(deps.get(t, ())) for t in tasks}
            ready = [t for t in tasks if not waiting[t]]
            heapq.heapify(ready)
            order = []
            while ready:
                task = heapq.heappop(ready)
                order.append(task)
                for other in tasks:
                    if task in waiting[other]:
                        waiting[other].discard(task)
                        if not waiting[other]:
                            heapq.heappush(ready, other)
            if len(order) != len(tasks):
                raise ValueError("cycle")
            return order
        """),
    code("hard", "evaluate(expr: str) -> int",
         "evaluates an expression of non-negative integers, + - * /, parentheses and spaces with the usual "
         "precedence and left associativity; / is integer division truncating toward zero.", """
        assert evaluate("1 + 2 * 3") == 7
        assert evaluate("(1 + 2) * 3") == 9
        assert evaluate("10 - 4 - 3") == 3
        assert evaluate("7 / 2") == 3
        assert evaluate("(1 - 8) / 2") == -3
        assert evaluate("2 * (3 + (4 - 1)) / 4") == 3
        assert evaluate("8 / 3 * 3") == 6
        assert evaluate("14-3*2") == 8
        assert evaluate("100") == 100
        """, """
        import re

        def evaluate(expr: str) -> int:
            tokens = re.findall(r"\\d+|[-+*/()]", expr)
            pos = 0

            def peek():
                return tokens[pos] if pos < len(tokens) else None

            def take():
                nonlocal pos
                pos += 1
                return tokens[pos - 1]

            def atom():
                token = take()
                if token == "(":
                    value = expression()
                    take()
                    return value
                return int(token)

            def term():
                value = atom()
                while peek() in ("*", "/"):
                    op, right = take(), atom()
                    if op == "*":
                        value *= right
                    else:
                        q = abs(value) // abs(right)
                        value = q if (value >= 0) == (right >= 0) else -q
                return value

            def expression():
                value = term()
                while peek() in ("+", "-"):
                    op, right = take(), term()
                    value = value + right if op == "+" else value - right
                return value

            return expression()
        """),
    code("hard", "lru_simulate(capacity: int, ops: list) -> list",
         'runs ops on an LRU cache: ("put", k, v) stores, evicting the least recently used key if full; '
         '("get", k) gives the value or -1; both are a use. Return the gets\' values.', """
        _t_ops = [("put", "a", 1), ("put", "b", 2), ("get", "a"), ("put", "c", 3), ("get", "b"), ("get", "c"),
                  ("put", "a", 10), ("put", "d", 4), ("get", "c"), ("get", "a"), ("get", "d")]
        assert lru_simulate(2, _t_ops) == [1, -1, 3, -1, 10, 4]
        assert lru_simulate(1, [("put", 1, 1), ("put", 2, 2), ("get", 1), ("get", 2)]) == [-1, 2]
        _t_ops = [("put", "x", 1), ("put", "y", 2), ("put", "x", 5), ("put", "z", 3), ("get", "x"), ("get", "y"),
                  ("get", "z")]
        assert lru_simulate(3, _t_ops) == [5, 2, 3]
        assert lru_simulate(2, [("get", 7)]) == [-1]
        """, """
        from collections import OrderedDict

        def lru_simulate(capacity: int, ops: list) -> list:
            cache = OrderedDict()
            results = []
            for op in ops:
                if op[0] == "get":
                    key = op[1]
                    if key in cache:
                        cache.move_to_end(key)
                        results.append(cache[key])
                    else:
                        results.append(-1)
                else:
                    _, key, value = op
                    if key in cache:
                        cache.move_to_end(key)
                    elif len(cache) >= capacity:
                        cache.popitem(last=False)
                    cache[key] = value
            return results
        """),
    code("hard", "lis_length(nums: list[int]) -> int",
         "returns the length of the longest strictly increasing subsequence of nums.", """
        assert lis_length([10, 9, 2, 5, 3, 7, 101, 18]) == 4
        assert lis_length([]) == 0
        assert lis_length([5, 5, 5]) == 1
        assert lis_length([4, 3, 2, 1]) == 1
        assert lis_length([3, 1, 8, 2, 5]) == 3
        assert lis_length(list(range(2000))) == 2000
        """, """
        import bisect

        def lis_length(nums: list[int]) -> int:
            tails = []
            for n in nums:
                i = bisect.bisect_left(tails, n)
                if i == len(tails):
                    tails.append(n)
                else:
                    tails[i] = n
            return len(tails)
        """),
    code("hard", "min_coins(coins: list[int], amount: int) -> int",
         "returns the fewest coins, with unlimited coins of each value, that sum to amount, or -1 if "
         "impossible (0 coins for amount 0).", """
        assert min_coins([1, 2, 5], 11) == 3
        assert min_coins([2], 3) == -1
        assert min_coins([1], 0) == 0
        assert min_coins([1, 3, 4], 6) == 2
        assert min_coins([5, 10], 3) == -1
        assert min_coins([2, 5, 10, 1], 27) == 4
        assert min_coins([7, 11, 13], 100) == 8
        """, """
        def min_coins(coins: list[int], amount: int) -> int:
            best = [0] + [None] * amount
            for total in range(1, amount + 1):
                options = [best[total - c] for c in coins if c <= total and best[total - c] is not None]
                best[total] = min(options) + 1 if options else None
            return -1 if best[amount] is None else best[amount]
        """),
    code("hard", "count_islands(grid: list[str]) -> int",
         "counts the groups of '1' cells joined horizontally or vertically in a grid given as equal-length "
         "strings of '0' and '1'.", """
        assert count_islands(["11000", "11000", "00100", "00011"]) == 3
        assert count_islands([]) == 0
        assert count_islands(["0"]) == 0
        assert count_islands(["101", "010", "101"]) == 5
        assert count_islands(["111", "101", "111"]) == 1
        """, """
        def count_islands(grid: list[str]) -> int:
            seen = set()
            count = 0
            for r, row in enumerate(grid):
                for c, cell in enumerate(row):
                    if cell != "1" or (r, c) in seen:
                        continue
                    count += 1
                    stack = [(r, c)]
                    seen.add((r, c))
                    while stack:
                        y, x = stack.pop()
                        for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                            if 0 <= ny < len(grid) and 0 <= nx < len(grid[ny]) and grid[ny][nx] == "1" \\
                                    and (ny, nx) not in seen:
                                seen.add((ny, nx))
                                stack.append((ny, nx))
            return count
        """),
    code("hard", "shortest_path(grid: list[str]) -> int",
         "returns the fewest steps from the top-left to the bottom-right cell, moving up, down, left or right "
         "through '.' cells ('#' is a wall), or -1 if it cannot be reached.", """
        assert shortest_path(["..", ".."]) == 2
        assert shortest_path(["."]) == 0
        assert shortest_path([".#", "#."]) == -1
        assert shortest_path(["...", "##.", "..."]) == 4
        assert shortest_path([".#...", ".#.#.", "...#."]) == 10
        assert shortest_path(["#."]) == -1
        """, """
        from collections import deque

        def shortest_path(grid: list[str]) -> int:
            rows, cols = len(grid), len(grid[0])
            if grid[0][0] != "." or grid[-1][-1] != ".":
                return -1
            dist = {(0, 0): 0}
            queue = deque([(0, 0)])
            while queue:
                y, x = queue.popleft()
                if (y, x) == (rows - 1, cols - 1):
                    return dist[(y, x)]
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= ny < rows and 0 <= nx < cols and grid[ny][nx] == "." and (ny, nx) not in dist:
                        dist[(ny, nx)] = dist[(y, x)] + 1
                        queue.append((ny, nx))
            return -1
        """),
    code("hard", "dijkstra(n: int, edges: list[tuple[int, int, int]], source: int) -> list[int]",
         "returns the shortest distances from source to nodes 0..n-1 along directed edges (u, v, weight), "
         "weights >= 0, with -1 for unreachable nodes.", """
        assert dijkstra(4, [(0, 1, 4), (0, 2, 1), (2, 1, 2), (1, 3, 1)], 0) == [0, 3, 1, 4]
        assert dijkstra(3, [], 1) == [-1, 0, -1]
        assert dijkstra(3, [(0, 1, 5), (1, 0, 1)], 1) == [1, 0, -1]
        assert dijkstra(2, [(0, 1, 3), (0, 1, 2)], 0) == [0, 2]
        assert dijkstra(5, [(0, 1, 10), (0, 2, 3), (2, 1, 4), (1, 3, 2), (2, 3, 8), (3, 4, 7)], 0) == [0, 7, 3, 9, 16]
        """, """
        import heapq

        def dijkstra(n: int, edges: list[tuple[int, int, int]], source: int) -> list[int]:
            adjacent = [[] for _ in range(n)]
            for u, v, w in edges:
                adjacent[u].append((v, w))
            dist = [-1] * n
            heap = [(0, source)]
            while heap:
                d, u = heapq.heappop(heap)
                if dist[u] != -1:
                    continue
                dist[u] = d
                for v, w in adjacent[u]:
                    if dist[v] == -1:
                        heapq.heappush(heap, (d + w, v))
            return dist
        """),
    code("hard", "parse_csv_line(line: str) -> list[str]",
         'splits one CSV line at commas; a field may be wrapped in double quotes, and then may contain commas, '
         'with "" inside standing for one quote.', '''
        assert parse_csv_line("a,b,c") == ["a", "b", "c"]
        assert parse_csv_line('"x,y",z') == ["x,y", "z"]
        assert parse_csv_line('"say ""hi""",2') == ['say "hi"', "2"]
        assert parse_csv_line("a,,b") == ["a", "", "b"]
        assert parse_csv_line("one") == ["one"]
        assert parse_csv_line("a,") == ["a", ""]
        ''', """
        def parse_csv_line(line: str) -> list[str]:
            fields, field, i, quoted = [], [], 0, False
            while i < len(line):
                ch = line[i]
                if quoted:
                    if ch == '"' and line[i + 1:i + 2] == '"':
                        field.append('"')
                        i += 1
                    elif ch == '"':
                        quoted = False
                    else:
                        field.append(ch)
                elif ch == '"':
                    quoted = True
                elif ch == ",":
                    fields.append("".join(field))
                    field = []
                else:
                    field.append(ch)
                i += 1
            fields.append("".join(field))
            return fields
        """),
    code("hard", "next_permutation(nums: list[int]) -> list[int]",
         "returns, as a new list, the next lexicographically greater arrangement of nums, or nums sorted "
         "ascending if there is none.", """
        assert next_permutation([1, 2, 3]) == [1, 3, 2]
        assert next_permutation([3, 2, 1]) == [1, 2, 3]
        assert next_permutation([1, 1, 5]) == [1, 5, 1]
        assert next_permutation([1, 3, 2]) == [2, 1, 3]
        assert next_permutation([2, 3, 1]) == [3, 1, 2]
        assert next_permutation([5]) == [5]
        _t_nums = [1, 2, 3]
        next_permutation(_t_nums)
        assert _t_nums == [1, 2, 3]
        """, """
        def next_permutation(nums: list[int]) -> list[int]:
            a = list(nums)
            i = len(a) - 2
            while i >= 0 and a[i] >= a[i + 1]:
                i -= 1
            if i < 0:
                return sorted(a)
            j = len(a) - 1
            while a[j] <= a[i]:
                j -= 1
            a[i], a[j] = a[j], a[i]
            a[i + 1:] = reversed(a[i + 1:])
            return a
        """),
    code("hard", "unique_permutations(s: str) -> list[str]",
         "returns all distinct rearrangements of the characters of the non-empty string s, sorted.", """
        assert unique_permutations("abc") == ["abc", "acb", "bac", "bca", "cab", "cba"]
        assert unique_permutations("aab") == ["aab", "aba", "baa"]
        assert unique_permutations("aaaa") == ["aaaa"]
        assert len(unique_permutations("aabbcc")) == 90
        """, """
        from itertools import permutations

        def unique_permutations(s: str) -> list[str]:
            return sorted({"".join(p) for p in permutations(s)})
        """),
    code("hard", "n_queens(n: int) -> int",
         "returns the number of ways to place n queens on an n x n chessboard so that no two attack each other.", """
        assert n_queens(1) == 1
        assert n_queens(2) == 0
        assert n_queens(3) == 0
        assert n_queens(4) == 2
        assert n_queens(6) == 4
        assert n_queens(8) == 92
        """, """
        def n_queens(n: int) -> int:
            def place(row, columns, diagonals, anti):
                if row == n:
                    return 1
                total = 0
                for c in range(n):
                    if c not in columns and row - c not in diagonals and row + c not in anti:
                        total += place(row + 1, columns | {c}, diagonals | {row - c}, anti | {row + c})
                return total
            return place(0, frozenset(), frozenset(), frozenset())
        """),
    code("hard", "is_valid_sudoku(rows: list[str]) -> bool",
         "checks a partly filled 9x9 Sudoku given as 9 strings of digits and '.': True if no digit repeats "
         "within a row, a column or a 3x3 box.", """
        def _t_board(cells):
            grid = [["."] * 9 for _ in range(9)]
            for (r, c), digit in cells.items():
                grid[r][c] = digit
            return ["".join(row) for row in grid]

        _t_full = ["".join(str((r * 3 + r // 3 + c) % 9 + 1) for c in range(9)) for r in range(9)]
        assert is_valid_sudoku(_t_full) is True
        assert is_valid_sudoku(_t_board({})) is True
        assert is_valid_sudoku(_t_board({(0, 0): "5", (1, 3): "5", (4, 4): "9"})) is True
        assert is_valid_sudoku(_t_board({(0, 0): "5", (0, 8): "5"})) is False
        assert is_valid_sudoku(_t_board({(0, 0): "5", (8, 0): "5"})) is False
        assert is_valid_sudoku(_t_board({(3, 3): "7", (5, 5): "7"})) is False
        _t_bad = [row for row in _t_full]
        _t_bad[4] = _t_bad[4][:4] + _t_bad[4][5] + _t_bad[4][5:]
        assert is_valid_sudoku(_t_bad) is False
        """, """
        def is_valid_sudoku(rows: list[str]) -> bool:
            seen = set()
            for r, row in enumerate(rows):
                for c, ch in enumerate(row):
                    if ch == ".":
                        continue
                    keys = {("row", r, ch), ("col", c, ch), ("box", r // 3, c // 3, ch)}
                    if keys & seen:
                        return False
                    seen |= keys
            return True
        """),
    code("hard", "word_break(s: str, words: list[str]) -> bool",
         "returns True if s can be split into a sequence of words from words (each may be reused); it must be "
         "fast for s of length 100.", """
        assert word_break("redbluered", ["red", "blue"]) is True
        assert word_break("redblu", ["red", "blue"]) is False
        assert word_break("aaaaaaa", ["aaa", "aaaa"]) is True
        assert word_break("aaaaaaa", ["aa", "aaaa"]) is False
        assert word_break("ab", ["a", "b", "ab"]) is True
        assert word_break("x", []) is False
        assert word_break("a" * 99 + "b", ["a", "aa", "aaa"]) is False
        """, """
        def word_break(s: str, words: list[str]) -> bool:
            vocabulary = set(words)
            ok = [True] + [False] * len(s)
            for end in range(1, len(s) + 1):
                ok[end] = any(ok[start] and s[start:end] in vocabulary for start in range(end))
            return ok[len(s)]
        """),
    code("hard", "num_decodings(s: str) -> int",
         'counts the ways to decode a string of digits where "1" to "26" stand for the letters A to Z '
         '(e.g. "12" is "AB" or "L"); it must be fast for 40 digits.', """
        assert num_decodings("12") == 2
        assert num_decodings("226") == 3
        assert num_decodings("0") == 0
        assert num_decodings("06") == 0
        assert num_decodings("10") == 1
        assert num_decodings("11106") == 2
        assert num_decodings("1" * 40) == 165580141
        """, """
        def num_decodings(s: str) -> int:
            if not s:
                return 0
            prev, cur = 1, (0 if s[0] == "0" else 1)   # ways to decode s[:i-1] and s[:i]
            for i in range(1, len(s)):
                nxt = cur if s[i] != "0" else 0
                if s[i - 1] == "1" or (s[i - 1] == "2" and s[i] <= "6"):
                    nxt += prev
                prev, cur = cur, nxt
            return cur
        """),
    code("hard", "max_non_overlapping(intervals: list[tuple[int, int]]) -> int",
         "returns the largest number of half-open intervals [start, end) that can be chosen with no two "
         "overlapping.", """
        assert max_non_overlapping([(1, 3), (2, 4), (3, 5)]) == 2
        assert max_non_overlapping([]) == 0
        assert max_non_overlapping([(1, 2), (2, 3), (3, 4)]) == 3
        assert max_non_overlapping([(1, 10), (2, 3), (4, 5), (6, 7)]) == 3
        assert max_non_overlapping([(1, 5), (1, 5)]) == 1
        """, """
        def max_non_overlapping(intervals: list[tuple[int, int]]) -> int:
            count, last_end = 0, None
            for start, end in sorted(intervals, key=lambda iv: iv[1]):
                if last_end is None or start >= last_end:
                    count += 1
                    last_end = end
            return count
        """),
    code("hard", "knapsack(weights: list[int], values: list[int], capacity: int) -> int",
         "returns the largest total value of items whose total weight is at most capacity, using each item "
         "at most once.", """
        assert knapsack([1, 3, 4, 5], [1, 4, 5, 7], 7) == 9
        assert knapsack([], [], 10) == 0
        assert knapsack([5], [10], 4) == 0
        assert knapsack([2, 2, 2], [3, 3, 3], 5) == 6
        assert knapsack([4, 3, 2], [10, 7, 6], 5) == 13
        """, """
        def knapsack(weights: list[int], values: list[int], capacity: int) -> int:
            best = [0] * (capacity + 1)
            for w, v in zip(weights, values):
                for c in range(capacity, w - 1, -1):
                    best[c] = max(best[c], best[c - w] + v)
            return best[capacity]
        """),
    code("hard", "spiral_order(matrix: list[list[int]]) -> list[int]",
         "returns the elements of a rectangular matrix in clockwise spiral order, starting at the top-left "
         "corner.", """
        assert spiral_order([[1, 2, 3], [4, 5, 6], [7, 8, 9]]) == [1, 2, 3, 6, 9, 8, 7, 4, 5]
        assert spiral_order([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]) == [1, 2, 3, 4, 8, 12, 11, 10, 9, 5, 6, 7]
        assert spiral_order([]) == []
        assert spiral_order([[1], [2], [3]]) == [1, 2, 3]
        assert spiral_order([[1, 2]]) == [1, 2]
        """, """
        def spiral_order(matrix: list[list[int]]) -> list[int]:
            out = []
            rows = [list(row) for row in matrix]
            while rows:
                out.extend(rows.pop(0))
                rows = [list(row) for row in zip(*rows)][::-1]
            return out
        """),
    code("hard", "simplify_path(path: str) -> str",
         'simplifies an absolute Unix path: resolves "." and "..", collapses repeated slashes and drops a '
         'trailing slash; ".." at the root stays at the root.', """
        assert simplify_path("/home/") == "/home"
        assert simplify_path("/a/./b/../../c/") == "/c"
        assert simplify_path("/../") == "/"
        assert simplify_path("/home//foo/") == "/home/foo"
        assert simplify_path("/") == "/"
        assert simplify_path("/a/b/c/../..") == "/a"
        assert simplify_path("//a//b") == "/a/b"
        assert simplify_path("/.../x") == "/.../x"
        """, """
        def simplify_path(path: str) -> str:
            parts = []
            for part in path.split("/"):
                if part in ("", "."):
                    continue
                if part == "..":
                    if parts:
                        parts.pop()
                else:
                    parts.append(part)
            return "/" + "/".join(parts)
        """),
    code("hard", "count_inversions(nums: list[int]) -> int",
         "returns the number of index pairs (i, j) with i < j and nums[i] > nums[j].", """
        assert count_inversions([2, 4, 1, 3, 5]) == 3
        assert count_inversions([]) == 0
        assert count_inversions([1, 2, 3]) == 0
        assert count_inversions([1, 1, 1]) == 0
        assert count_inversions([5, 4, 3, 2, 1]) == 10
        assert count_inversions(list(range(1000, 0, -1))) == 499500
        """, """
        def count_inversions(nums: list[int]) -> int:
            def sort(a):
                if len(a) <= 1:
                    return a, 0
                left, x = sort(a[:len(a) // 2])
                right, y = sort(a[len(a) // 2:])
                merged, count, i, j = [], x + y, 0, 0
                while i < len(left) and j < len(right):
                    if right[j] < left[i]:
                        merged.append(right[j])
                        count += len(left) - i
                        j += 1
                    else:
                        merged.append(left[i])
                        i += 1
                return merged + left[i:] + right[j:], count
            return sort(list(nums))[1]
        """),
    code("hard", "longest_palindrome(s: str) -> str",
         "returns the longest substring of s that is a palindrome; among several of that length, the one "
         "that starts first.", """
        assert longest_palindrome("xabay") == "aba"
        assert longest_palindrome("abccbx") == "bccb"
        assert longest_palindrome("a") == "a"
        assert longest_palindrome("") == ""
        assert longest_palindrome("abcd") == "a"
        assert longest_palindrome("racecarxyz") == "racecar"
        assert longest_palindrome("abacdfgdcaba") == "aba"
        assert longest_palindrome("aaab") == "aaa"
        """, """
        def longest_palindrome(s: str) -> str:
            best = s[:1]
            for center in range(len(s)):
                for lo, hi in ((center, center), (center, center + 1)):
                    while lo >= 0 and hi < len(s) and s[lo] == s[hi]:
                        lo, hi = lo - 1, hi + 1
                    if hi - lo - 1 > len(best):  # centers in order: the first of a length starts first
                        best = s[lo + 1:hi]
            return best
        """),
    code("hard", "wildcard_match(text: str, pattern: str) -> bool",
         'returns True if pattern matches the whole of text, where "?" matches any one character and "*" any '
         'sequence, including an empty one.', """
        assert wildcard_match("abc", "a?c") is True
        assert wildcard_match("abc", "a*") is True
        assert wildcard_match("abc", "*c") is True
        assert wildcard_match("", "*") is True
        assert wildcard_match("abcde", "a*c?e") is True
        assert wildcard_match("mississippi", "m*iss*p?i") is True
        assert wildcard_match("abc", "a*d") is False
        assert wildcard_match("", "?") is False
        assert wildcard_match("aa", "a") is False
        """, """
        def wildcard_match(text: str, pattern: str) -> bool:
            ok = [[False] * (len(pattern) + 1) for _ in range(len(text) + 1)]
            ok[0][0] = True
            for j, p in enumerate(pattern, 1):
                ok[0][j] = ok[0][j - 1] and p == "*"
            for i, t in enumerate(text, 1):
                for j, p in enumerate(pattern, 1):
                    if p == "*":
                        ok[i][j] = ok[i][j - 1] or ok[i - 1][j]
                    else:
                        ok[i][j] = ok[i - 1][j - 1] and (p == "?" or p == t)
            return ok[len(text)][len(pattern)]
        """),
    code("hard", "stack_machine(program: list[str]) -> list[int]",
         'runs "PUSH n", "POP", "ADD", "SUB" (second minus top), "MUL", "DUP", "SWAP" and "PRINT" (record '
         'the top, keep it) on an integer stack and returns the recorded values.', """
        assert stack_machine(["PUSH 3", "PUSH 4", "ADD", "PRINT"]) == [7]
        assert stack_machine(["PUSH 10", "PUSH 4", "SUB", "PRINT", "DUP", "MUL", "PRINT"]) == [6, 36]
        assert stack_machine(["PUSH 1", "PUSH 2", "SWAP", "PRINT", "POP", "PRINT"]) == [1, 2]
        assert stack_machine([]) == []
        assert stack_machine(["PUSH -5", "PRINT"]) == [-5]
        """, """
        def stack_machine(program: list[str]) -> list[int]:
            stack, printed = [], []
            for line in program:
                op, *arg = line.split()
                if op == "PUSH":
                    stack.append(int(arg[0]))
                elif op == "POP":
                    stack.pop()
                elif op in ("ADD", "SUB", "MUL"):
                    b, a = stack.pop(), stack.pop()
                    stack.append(a + b if op == "ADD" else a - b if op == "SUB" else a * b)
                elif op == "DUP":
                    stack.append(stack[-1])
                elif op == "SWAP":
                    stack[-1], stack[-2] = stack[-2], stack[-1]
                elif op == "PRINT":
                    printed.append(stack[-1])
            return printed
        """),
    code("hard", "top_k_frequent(words: list[str], k: int) -> list[str]",
         "returns the k most frequent distinct words (fewer if there are fewer), by decreasing count and "
         "alphabetically among equal counts.", """
        assert top_k_frequent(["b", "a", "b", "c", "a", "b"], 2) == ["b", "a"]
        assert top_k_frequent(["x", "y", "z"], 2) == ["x", "y"]
        assert top_k_frequent([], 3) == []
        assert top_k_frequent(["p", "q", "q", "p", "r"], 3) == ["p", "q", "r"]
        assert top_k_frequent(["a"], 5) == ["a"]
        """, """
        from collections import Counter

        def top_k_frequent(words: list[str], k: int) -> list[str]:
            counts = Counter(words)
            return sorted(counts, key=lambda w: (-counts[w], w))[:k]
        """),
    code("hard", "determinant(m: list[list[int]]) -> int",
         "returns the exact integer determinant of a square integer matrix.", """
        assert determinant([[1, 2], [3, 4]]) == -2
        assert determinant([[2]]) == 2
        assert determinant([[1, 0, 0], [0, 1, 0], [0, 0, 1]]) == 1
        assert determinant([[6, 1, 1], [4, -2, 5], [2, 8, 7]]) == -306
        assert determinant([[1, 2], [2, 4]]) == 0
        assert determinant([[2, 0, 1, 3], [1, 1, 0, 2], [0, 3, 1, 1], [4, 1, 2, 0]]) == -32
        assert determinant([[0, 1], [1, 0]]) == -1
        """, """
        from fractions import Fraction

        def determinant(m: list[list[int]]) -> int:
            a = [[Fraction(x) for x in row] for row in m]
            n, det = len(a), Fraction(1)
            for col in range(n):
                pivot = next((r for r in range(col, n) if a[r][col] != 0), None)
                if pivot is None:
                    return 0
                if pivot != col:
                    a[col], a[pivot] = a[pivot], a[col]
                    det = -det
                det *= a[col][col]
                for r in range(col + 1, n):
                    factor = a[r][col] / a[col][col]
                    a[r] = [x - factor * y for x, y in zip(a[r], a[col])]
            return int(det)
        """),
    code("hard", "expand(s: str) -> str",
         'expands groups k[...] in s, where the text in the brackets is repeated k times and groups may nest, '
         'e.g. "2[ab]c" -> "ababc".', """
        assert expand("2[ab]c") == "ababc"
        assert expand("3[a]2[bc]") == "aaabcbc"
        assert expand("3[a2[c]]") == "accaccacc"
        assert expand("abc") == "abc"
        assert expand("10[x]") == "x" * 10
        assert expand("2[a2[b]c]") == "abbcabbc"
        assert expand("") == ""
        """, """
        def expand(s: str) -> str:
            stack = [["", 0]]
            count = 0
            for ch in s:
                if ch.isdigit():
                    count = count * 10 + int(ch)
                elif ch == "[":
                    stack.append(["", count])
                    count = 0
                elif ch == "]":
                    text, times = stack.pop()
                    stack[-1][0] += text * times
                else:
                    stack[-1][0] += ch
            return stack[0][0]
        """),
]


# ---------------------------------------------------------------------------------------- arithmetic

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def exact(expression: str) -> Fraction:
    """The exact value of an expression of decimal numbers, + - * / and parentheses."""
    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"unsupported expression: {expression}")
    return value(ast.parse(expression, mode="eval").body)


def decimal_text(x: Fraction) -> str:
    """x written exactly in decimal; refuses a value without a finite decimal expansion."""
    for places in range(12):
        scaled = x * 10 ** places
        if scaled.denominator == 1:
            digits = str(abs(scaled.numerator)).rjust(places + 1, "0")
            text = digits if places == 0 else f"{digits[:-places]}.{digits[-places:]}"
            return ("-" if x < 0 else "") + text
    raise ValueError(f"{x} has no short decimal expansion")


def plain(expression: str) -> dict:
    """"What is <expression>?" answered by the expression's exact value."""
    shown = expression.replace("*", " * ").replace("/", " / ").replace("  ", " ")
    return {"kind": "arithmetic", "prompt": f"What is {shown}? {NUMBER_SUFFIX}",
            "answer": decimal_text(exact(expression))}


def asked(question: str, expression: str) -> dict:
    """A question in words about one expression (powers, percentages, roots): the answer is the expression's."""
    return {"kind": "arithmetic", "prompt": f"{question} {NUMBER_SUFFIX}", "answer": decimal_text(exact(expression))}


def word(template: str, solve, **numbers) -> dict:
    """A word problem: `numbers` are filled into the text and passed to `solve`, so they cannot disagree."""
    values = {k: Fraction(str(v)) for k, v in numbers.items()}
    return {"kind": "arithmetic", "prompt": f"{template.format(**numbers)} {NUMBER_SUFFIX}",
            "answer": decimal_text(Fraction(solve(**values)))}


def ceil_div(a: Fraction, b: Fraction) -> int:
    return math.ceil(a / b)


ARITHMETIC = [
    # one step
    plain("47 + 38"), plain("29 + 64"), plain("56 + 87"),
    plain("91 - 47"), plain("305 - 178"), plain("23 - 58"), plain("1000 - 357"),
    plain("482 + 759"), plain("1275 + 3648"), plain("7*86"),
    plain("23*17"), plain("48*36"), plain("99*99"),
    plain("347*28"), plain("512*47"), plain("806*39"),
    plain("123*456"), plain("709*384"), plain("999*101"), plain("625*832"),
    plain("4821*317"), plain("2048*125"), plain("7365*904"),
    plain("1234*5678"), plain("8031*2947"), plain("31416*271"),
    plain("7452/9"), plain("1512/24"), plain("98304/768"), plain("45/4"),
    plain("3.75 + 8.6"), plain("12.5*0.4"), plain("7.2 - 9.85"), plain("0.125*64"), plain("19.99*3"),
    plain("-15*7"),
    asked("What is 15% of 240?", "15 * 240 / 100"), asked("What is 8% of 1250?", "8 * 1250 / 100"),
    asked("What is 12.5% of 336?", "12.5 * 336 / 100"),
    asked("What is 2 to the power of 12?", "2*2*2*2*2*2*2*2*2*2*2*2"), asked("What is 13 squared?", "13*13"),
    asked("What is 17 cubed?", "17*17*17"), asked("What is the square root of 1764?", "42"),
    # order of operations
    plain("17 + 6*9 - 4"), plain("(12 + 8)*(15 - 7)"), plain("100 - 4*(6 + 7)"),
    plain("48/(6 - 2) + 7"), plain("7*(8 - 3) - 12/4"),
    # word problems, 2 to 4 steps
    word("A baker makes {a} trays of {b} muffins each and sells {c} muffins. How many muffins are left?",
         lambda a, b, c: a * b - c, a=14, b=24, c=275),
    word("Tickets cost ${a} for adults and ${b} for children. How many dollars do {c} adults and {d} children "
         "pay in total?", lambda a, b, c, d: a * c + b * d, a=18, b=11, c=3, d=4),
    word("A train travels at {a} km/h for {b} hours, then at {c} km/h for {d} hours. How many kilometres does "
         "it travel in total?", lambda a, b, c, d: a * b + c * d, a=80, b=3, c=65, d=2),
    word("A library has {a} shelves of {b} books each. It lends out {c} books and receives {d} donated books. "
         "How many books does it have now?", lambda a, b, c, d: a * b - c + d, a=8, b=47, c=129, d=56),
    word("Maya saves ${a} every week for {b} weeks, then spends ${c} on a bike. How many dollars does she have "
         "left?", lambda a, b, c: a * b - c, a=35, b=12, c=289),
    word("A garden is {a} m long and {b} m wide. A path covers {c} square metres of it. How many square metres "
         "are left for planting?", lambda a, b, c: a * b - c, a=18, b=12, c=37),
    word("A box holds {a} pencils. A school needs {b} pencils. How many boxes must it buy?",
         lambda a, b: ceil_div(b, a), a=12, b=290),
    word("A shop sells pens at {a} for ${b}. How many dollars do {c} pens cost?",
         lambda a, b, c: c / a * b, a=4, b=3, c=52),
    word("A car uses {a} litres of fuel per 100 km. How many litres does it use on a {b} km trip?",
         lambda a, b: a * b / 100, a="6.5", b=340),
    word("A jacket costs ${a}. It is discounted by {b}%, and then a ${c} coupon is applied. What is the final "
         "price in dollars?", lambda a, b, c: a * (100 - b) / 100 - c, a=120, b=25, c=15),
    word("A class has {a} students. {b}% of them walk to school and the rest take the bus. How many take the "
         "bus?", lambda a, b: a - a * b / 100, a=40, b=35),
    word("A farmer has {a} hens and each lays {b} eggs a week. Eggs are packed in cartons of {c}. How many "
         "full cartons are packed in {d} weeks?", lambda a, b, c, d: (a * b * d) // c, a=23, b=5, c=12, d=4),
    word("Ana is {a} years old and her father is {b} times her age. How old will her father be in {c} years?",
         lambda a, b, c: a * b + c, a=9, b=4, c=7),
    word("A tank holds {a} litres and is {b}% full. Then {c} litres are added. How many litres are in it now?",
         lambda a, b, c: a * b / 100 + c, a=800, b=45, c=130),
    word("A worker earns ${a} an hour for the first 40 hours of a week and ${b} an hour beyond that. How many "
         "dollars does she earn in a {c}-hour week?", lambda a, b, c: a * 40 + b * (c - 40), a=22, b=33, c=46),
    word("A printer prints {a} pages a minute. How many minutes does it take to print {b} copies of a {c}-page "
         "report?", lambda a, b, c: b * c / a, a=15, b=12, c=35),
    word("A recipe needs {a} g of flour for {b} cookies. How many grams of flour are needed for {c} cookies?",
         lambda a, b, c: a * c / b, a=250, b=20, c=72),
    word("An order has {a} items at ${b} each and {c} items at ${d} each, plus ${e} shipping. What is the "
         "total in dollars?", lambda a, b, c, d, e: a * b + c * d + e, a=3, b="12.50", c=2, d="7.25", e="4.99"),
    word("A bus starts with {a} passengers. At the first stop {b} get off and {c} get on; at the second stop "
         "{d} get off and {e} get on. How many passengers are on the bus now?",
         lambda a, b, c, d, e: a - b + c - d + e, a=38, b=12, c=7, d=15, e=9),
    word("A phone plan costs ${a} a month plus ${b} for each GB used beyond {c} GB. How many dollars is the "
         "bill for a month with {d} GB used?", lambda a, b, c, d: a + b * (d - c), a=25, b=8, c=10, d="13.5"),
    word("A warehouse has {a} crates; each crate holds {b} boxes and each box holds {c} bolts. How many bolts "
         "are there?", lambda a, b, c: a * b * c, a=17, b=24, c=36),
    word("If {a} workers build a wall in {b} days, how many days would {c} workers take at the same rate?",
         lambda a, b, c: a * b / c, a=6, b=10, c=4),
    word("A store had {a} apples. It sold {b}% of them on Monday and {c} more on Tuesday. How many apples are "
         "left?", lambda a, b, c: a - a * b / 100 - c, a=250, b=30, c=64),
    word("Lena buys {a} notebooks at ${b} each and pays with a ${c} bill. How many dollars of change does she "
         "get?", lambda a, b, c: c - a * b, a=4, b="2.35", c=20),
]


# ---------------------------------------------------------------------------------------------- facts

def fact(question: str, *answers: str, suffix: str = "Answer in one or two words.") -> dict:
    return {"kind": "fact", "prompt": f"{question} {suffix}", "answers": list(answers)}


NAME = "Answer with just the name."
YEAR = "Answer with just the year."
NUMBER = "Answer with just the number."

FACTS = [
    # very common knowledge
    fact("What is the capital of France?", "Paris"),
    fact("What is the capital of Japan?", "Tokyo"),
    fact("What is the capital of Italy?", "Rome"),
    fact("What is the capital of Egypt?", "Cairo"),
    fact("Which planet is known as the Red Planet?", "Mars"),
    fact("What is the largest planet in the solar system?", "Jupiter"),
    fact("Which planet is closest to the Sun?", "Mercury"),
    fact("What is the largest ocean on Earth?", "Pacific"),
    fact("How many legs does a spider have?", "8", "eight", suffix=NUMBER),
    fact("How many days are there in a leap year?", "366", suffix=NUMBER),
    fact("How many sides does a hexagon have?", "6", "six", suffix=NUMBER),
    fact("Who wrote the play Romeo and Juliet?", "Shakespeare", suffix=NAME),
    fact("Who painted the Mona Lisa?", "Leonardo", "da Vinci", suffix=NAME),
    fact("Which gas do plants take in from the air for photosynthesis?", "carbon dioxide", "CO2"),
    fact("What is the chemical symbol for gold?", "Au"),
    fact("What is the chemical symbol for sodium?", "Na"),
    fact("What is the chemical symbol for iron?", "Fe"),
    fact("Which element has the atomic number 1?", "hydrogen"),
    fact("What is the hardest natural substance?", "diamond", "diamonds"),
    fact("Who was the first person to walk on the Moon?", "Armstrong", suffix=NAME),
    fact("Who was the first president of the United States?", "Washington", suffix=NAME),
    fact("What is the currency of Japan?", "yen"),
    fact("Which planet has the most famous ring system?", "Saturn"),
    fact("What is the boiling point of water at sea level in degrees Fahrenheit?", "212", suffix=NUMBER),
    fact("Which organ of the human body produces insulin?", "pancreas"),
    fact("Off the coast of which country is the Great Barrier Reef?", "Australia"),
    # school knowledge
    fact("What is the capital of Australia?", "Canberra"),
    fact("What is the capital of Canada?", "Ottawa"),
    fact("What is the capital of Turkey?", "Ankara"),
    fact("What is the capital of Brazil?", "Brasilia"),
    fact("What is the capital of Nigeria?", "Abuja"),
    fact("What is the capital of Kenya?", "Nairobi"),
    fact("What is the capital of Peru?", "Lima"),
    fact("What is the capital of New Zealand?", "Wellington"),
    fact("What is the chemical symbol for silver?", "Ag"),
    fact("What is the chemical symbol for potassium?", "K"),
    fact("What is the chemical symbol for lead?", "Pb"),
    fact("Which element has the chemical symbol Hg?", "mercury"),
    fact("Which element has the atomic number 6?", "carbon"),
    fact("What is the SI unit of force?", "newton", "newtons"),
    fact("What is the SI unit of electric current?", "ampere", "amperes", "amp", "amps"),
    fact("What is the SI unit of frequency?", "hertz"),
    fact("What is the SI unit of power?", "watt", "watts"),
    fact("Who wrote the novel Pride and Prejudice?", "Austen", suffix=NAME),
    fact("Who wrote the novel Nineteen Eighty-Four?", "Orwell", suffix=NAME),
    fact("Who composed the violin concertos known as The Four Seasons?", "Vivaldi", suffix=NAME),
    fact("Who discovered penicillin in 1928?", "Fleming", suffix=NAME),
    fact("Who painted The Starry Night?", "van Gogh", "Gogh", suffix=NAME),
    fact("In what year did the Berlin Wall fall?", "1989", suffix=YEAR),
    fact("In what year did Apollo 11 land on the Moon?", "1969", suffix=YEAR),
    fact("In what year did the Titanic sink?", "1912", suffix=YEAR),
    fact("In what year did the storming of the Bastille take place?", "1789", suffix=YEAR),
    fact("What is the largest bone in the human body?", "femur", "thigh bone", "thighbone"),
    fact("What is the tallest mountain in Africa?", "Kilimanjaro"),
    # less common
    fact("What is the capital of Mongolia?", "Ulaanbaatar", "Ulan Bator", "Ulaan Baatar"),
    fact("What is the capital of Bhutan?", "Thimphu"),
    fact("What is the capital of Slovenia?", "Ljubljana"),
    fact("What is the capital of Uruguay?", "Montevideo"),
    fact("What is the capital of Laos?", "Vientiane"),
    fact("What is the capital of Namibia?", "Windhoek"),
    fact("What is the capital of Paraguay?", "Asuncion"),
    fact("What is the capital of Kyrgyzstan?", "Bishkek"),
    fact("What is the capital of Fiji?", "Suva"),
    fact("What is the chemical symbol for tungsten?", "W"),
    fact("What is the SI unit of luminous intensity?", "candela", "candelas"),
    fact("What is the SI unit of magnetic flux density?", "tesla", "teslas"),
    fact("Who wrote the novel One Hundred Years of Solitude?", "Garcia Marquez", "Marquez", suffix=NAME),
    fact("Who wrote the novel Things Fall Apart?", "Achebe", suffix=NAME),
    fact("Who wrote the novel The Brothers Karamazov?", "Dostoevsky", "Dostoyevsky", "Dostoevskii",
         "Dostoievski", "Dostoevski", suffix=NAME),
    fact("In what year was the Battle of Hastings fought?", "1066", suffix=YEAR),
    fact("In what year was Magna Carta first sealed?", "1215", suffix=YEAR),
    fact("What is the largest moon of Saturn?", "Titan"),
    fact("In which country is the city of Timbuktu?", "Mali"),
]


# ---------------------------------------------------------------------------------------------- build

def build_items() -> list[dict]:
    """All items, with ids numbered per kind in the order above."""
    items = []
    for prefix, group in (("code", CODE), ("math", ARITHMETIC), ("fact", FACTS)):
        for number, item in enumerate(group, 1):
            items.append({"id": f"{prefix}-{number:03d}", **item})
    return items


def main() -> None:
    items = build_items()
    with OUT.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    counts = {kind: sum(1 for i in items if i["kind"] == kind) for kind in ("code", "arithmetic", "fact")}
    print(f"wrote {len(items)} items to {OUT}: {counts}")


if __name__ == "__main__":
    main()
